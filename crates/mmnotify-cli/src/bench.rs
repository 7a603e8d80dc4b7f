//! `mmnotify bench`: a short run of every benchmark figure against its baseline, measured in
//! the same process; prints the table and the targets, and writes the SVG charts and
//! `results.md` that docs/PERFORMANCE.md shows.
//!
//! The bodies, fixtures and baselines are `mmnotify-bench`'s, the same code that
//! `cargo bench -p mmnotify` times with criterion.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use mmnotify_bench::alloc::CountingAlloc;
use mmnotify_bench::suite::{self, Config, Machine, Report, Unit};
use plotters::prelude::*;

/// Counts heap allocations per thread, so that the run can check the zero-allocation target
/// of the fast path. It forwards to the system allocator; the only cost is one thread-local
/// increment per allocation.
#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Options of `mmnotify bench`.
#[derive(clap::Args, Debug)]
pub(crate) struct BenchArgs {
    /// Shorter batches and interval counts of 1e3/1e4/1e5 instead of 1e3/1e5/1e6 (well under a
    /// minute).
    #[arg(long)]
    pub(crate) quick: bool,
    /// Where to write the SVG charts and results.md.
    #[arg(long, value_name = "DIR", default_value = "docs/perf")]
    pub(crate) out: PathBuf,
    /// Which benchmarks: the engine's fast paths, the userfaultfd watcher on real memory
    /// (Linux), or both.
    #[arg(long, value_enum, default_value_t = Group::All)]
    pub(crate) group: Group,
}

/// A group of benchmarks.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Group {
    /// Every group.
    All,
    /// The engine's fast paths against naive baselines.
    Engine,
    /// munmap / madvise / mremap on memory the userfaultfd watcher watches, against unwatched
    /// memory and a bare userfaultfd reader (Linux).
    Watch,
    /// The registration cache against a UCX-like cache (Linux).
    Rcache,
}

/// Runs the benchmarks, prints the table, writes the charts.
///
/// # Errors
///
/// A message if the output directory or a chart cannot be written.
pub(crate) fn run(args: &BenchArgs) -> Result<(), String> {
    let config = Config { quick: args.quick };
    if matches!(args.group, Group::All | Group::Engine) {
        run_engine(args, &config)?;
    }
    if matches!(args.group, Group::All | Group::Watch) {
        run_watch(args, &config)?;
    }
    #[cfg(target_os = "linux")]
    if matches!(args.group, Group::All | Group::Rcache) {
        run_rcache(args, &config)?;
    }
    Ok(())
}

/// The registration-cache group (`mmnotify_bench::rcache`): its table and `rcache.md`.
#[cfg(target_os = "linux")]
fn run_rcache(args: &BenchArgs, config: &Config) -> Result<(), String> {
    let began = std::time::Instant::now();
    let machine = Machine::current();
    eprintln!(
        "mmnotify bench{} (rcache group): each figure is timed next to a UCX-like cache in this process",
        if args.quick { " --quick" } else { "" }
    );
    let (rows, targets) =
        mmnotify_bench::rcache::figures(&config.budget(), &mut |step| eprintln!("  {step}"));
    let report = Report {
        quick: args.quick,
        machine: Machine {
            load_after: Machine::loadavg(),
            ..machine
        },
        rows,
        intervals: Vec::new(),
        scaling: Vec::new(),
        targets,
        elapsed: began.elapsed(),
    };
    print!("{}", text_table(&report));
    std::fs::create_dir_all(&args.out)
        .map_err(|e| format!("cannot create {}: {e}", args.out.display()))?;
    let path = args.out.join("rcache.md");
    std::fs::write(&path, markdown(&report, "bench --group rcache"))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    println!(
        "\nwrote {} ({:.1} s)",
        path.display(),
        report.elapsed.as_secs_f64()
    );
    Ok(())
}

/// The engine group: the table, the charts, results.md and the results section of
/// docs/PERFORMANCE.md.
fn run_engine(args: &BenchArgs, config: &Config) -> Result<(), String> {
    eprintln!(
        "mmnotify bench{}: every figure is timed next to its baseline in this process",
        if args.quick { " --quick" } else { "" }
    );
    let report = suite::run(config, &mut |step| eprintln!("  {step}"));
    print!("{}", text_table(&report));
    std::fs::create_dir_all(&args.out)
        .map_err(|e| format!("cannot create {}: {e}", args.out.display()))?;
    let intervals = args.out.join("intervals.svg");
    let scaling = args.out.join("scaling.svg");
    let results = args.out.join("results.md");
    intervals_chart(&report, &intervals)?;
    scaling_chart(&report, &scaling)?;
    let table = markdown(&report, "bench");
    std::fs::write(&results, &table)
        .map_err(|e| format!("cannot write {}: {e}", results.display()))?;
    if !args.quick {
        if let Some(doc) = update_performance_doc(&args.out, &table, BEGIN, END)? {
            println!("updated the results section of {}", doc.display());
        }
    }
    println!(
        "\nwrote {}, {} and {} ({:.1} s)",
        intervals.display(),
        scaling.display(),
        results.display(),
        report.elapsed.as_secs_f64()
    );
    Ok(())
}

/// The watcher group (see `watch_bench`): its table, `watch.md`, and its section of
/// docs/PERFORMANCE.md.
#[cfg(target_os = "linux")]
fn run_watch(args: &BenchArgs, config: &Config) -> Result<(), String> {
    let began = std::time::Instant::now();
    let machine = Machine::current();
    eprintln!(
        "mmnotify bench{} (watch group): each call on watched memory is timed next to the same call on unwatched memory and with a bare userfaultfd reader",
        if args.quick { " --quick" } else { "" }
    );
    let group = crate::watch_bench::run(config, &mut |step| eprintln!("  {step}"))?;
    let report = Report {
        quick: args.quick,
        machine: Machine {
            load_after: Machine::loadavg(),
            ..machine
        },
        rows: group.rows,
        intervals: Vec::new(),
        scaling: Vec::new(),
        targets: group.targets,
        elapsed: began.elapsed(),
    };
    print!("{}", text_table(&report));
    std::fs::create_dir_all(&args.out)
        .map_err(|e| format!("cannot create {}: {e}", args.out.display()))?;
    let path = args.out.join("watch.md");
    let table = markdown(&report, "bench --group watch");
    std::fs::write(&path, &table).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    if !args.quick {
        if let Some(doc) = update_performance_doc(&args.out, &table, WATCH_BEGIN, WATCH_END)? {
            println!("updated the watcher section of {}", doc.display());
        }
    }
    println!(
        "\nwrote {} ({:.1} s)",
        path.display(),
        report.elapsed.as_secs_f64()
    );
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn run_watch(args: &BenchArgs, _config: &Config) -> Result<(), String> {
    if args.group == Group::Watch {
        return Err("the watcher benchmarks need Linux (userfaultfd)".into());
    }
    eprintln!("mmnotify bench: the watch group needs Linux; skipped");
    Ok(())
}

fn value(v: f64, unit: Unit) -> String {
    match unit {
        Unit::Ns if v >= 100_000.0 => format!("{:.0} us", v / 1_000.0),
        Unit::Ns if v >= 100.0 => format!("{v:.0} ns"),
        Unit::Ns => format!("{v:.2} ns"),
        Unit::Speedup => format!("x{v:.2}"),
        Unit::Allocs => format!("{v} allocs"),
    }
}

fn ratio(r: Option<f64>) -> String {
    match r {
        Some(r) if r >= 100.0 => format!("{r:.0}"),
        Some(r) if r >= 0.1 => format!("{r:.2}"),
        Some(r) => format!("{r:.4}"),
        None => "-".to_string(),
    }
}

fn machine_line(r: &Report) -> String {
    format!(
        "{} logical CPUs, {}; load average {} before, {} after; {} run, {:.1} s",
        r.machine.nproc,
        r.machine.cpu_model,
        r.machine.load_before,
        r.machine.load_after,
        if r.quick { "--quick" } else { "full" },
        r.elapsed.as_secs_f64()
    )
}

fn text_table(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "\n{}\n", machine_line(r));
    let _ = writeln!(
        s,
        "{:<28} {:>11}  {:>11} {:>8}  what (baseline)",
        "figure", "value", "baseline", "ratio"
    );
    for row in &r.rows {
        let (bname, bval) = match &row.baseline {
            Some(b) => (b.name.as_str(), value(b.value, row.unit)),
            None => ("", "-".to_string()),
        };
        let _ = writeln!(
            s,
            "{:<28} {:>11}  {:>11} {:>8}  {}{}",
            row.id,
            value(row.value, row.unit),
            bval,
            ratio(row.ratio()),
            row.figure,
            if bname.is_empty() {
                String::new()
            } else {
                format!(" ({bname})")
            }
        );
    }
    let _ = writeln!(
        s,
        "\nratio = value / baseline (for ns: lower is better)\n\ntargets:"
    );
    for t in &r.targets {
        let _ = writeln!(
            s,
            "  [{:^6}] {}: {}",
            t.verdict.label(),
            t.target,
            t.measured
        );
    }
    s
}

/// Markdown would read `RwLock<Vec<...>>` as HTML tags, and `MAYMOVE|FIXED` as a column break.
fn html_escape(s: &str) -> String {
    s.replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('|', "\\|")
}

fn markdown(r: &Report, command: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<!-- Written by `cargo run --release -- {command}{}`; do not edit by hand. -->\n",
        if r.quick { " --quick" } else { "" }
    );
    let _ = writeln!(s, "Machine: {}.\n", machine_line(r));
    let _ = writeln!(
        s,
        "| id | figure | value | baseline | baseline value | ratio |\n|---|---|---:|---|---:|---:|"
    );
    for row in &r.rows {
        let (bname, bval) = match &row.baseline {
            Some(b) => (b.name.clone(), value(b.value, row.unit)),
            None => (String::new(), "-".to_string()),
        };
        let _ = writeln!(
            s,
            "| `{}` | {} | {} | {} | {} | {} |",
            row.id,
            html_escape(&row.figure),
            value(row.value, row.unit),
            html_escape(&bname),
            bval,
            ratio(row.ratio())
        );
    }
    let _ = writeln!(
        s,
        "\nRatio = value / baseline; for ns figures lower is better.\n"
    );
    let _ = writeln!(s, "| target | measured | verdict |\n|---|---|---|");
    for t in &r.targets {
        let _ = writeln!(
            s,
            "| {} | {} | **{}** |",
            html_escape(&t.target),
            html_escape(&t.measured),
            t.verdict.label()
        );
    }
    s
}

/// Markers around the generated part of docs/PERFORMANCE.md.
const BEGIN: &str = "<!-- bench-results:begin -->";
const END: &str = "<!-- bench-results:end -->";
/// Markers around the watcher group's generated part of docs/PERFORMANCE.md.
#[cfg(target_os = "linux")]
const WATCH_BEGIN: &str = "<!-- bench-watch:begin -->";
#[cfg(target_os = "linux")]
const WATCH_END: &str = "<!-- bench-watch:end -->";

/// Replaces the text between `begin` and `end` (e.g. [`BEGIN`] and [`END`]) in
/// `PERFORMANCE.md` beside the output directory (docs/PERFORMANCE.md for the default
/// `docs/perf`) with `table`, if that file exists and has both markers. Returns the path it
/// updated.
fn update_performance_doc(
    out: &Path,
    table: &str,
    begin: &str,
    end: &str,
) -> Result<Option<PathBuf>, String> {
    let Some(doc) = out.parent().map(|p| p.join("PERFORMANCE.md")) else {
        return Ok(None);
    };
    let Ok(text) = std::fs::read_to_string(&doc) else {
        return Ok(None);
    };
    let (Some(b), Some(e)) = (text.find(begin), text.find(end)) else {
        return Ok(None);
    };
    if e < b {
        return Ok(None);
    }
    let updated = format!("{}{begin}\n{table}{}", &text[..b], &text[e..]);
    std::fs::write(&doc, updated).map_err(|e| format!("cannot write {}: {e}", doc.display()))?;
    Ok(Some(doc))
}

fn chart_err(path: &Path) -> impl Fn(String) -> String + '_ {
    move |e| format!("cannot draw {}: {e}", path.display())
}

const COLOURS: [RGBColor; 3] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
];

/// Chart (b): ns per invalidation against the number of intervals, log-log; one line per hit
/// count for the engine (solid) and for the linear scan (thin, same colour).
fn intervals_chart(r: &Report, path: &Path) -> Result<(), String> {
    let err = chart_err(path);
    let pts = &r.intervals;
    let xs: Vec<f64> = pts.iter().map(|p| p.n as f64).collect();
    let ys: Vec<f64> = pts.iter().flat_map(|p| [p.engine_ns, p.naive_ns]).collect();
    let (xmin, xmax) = (
        xs.iter().copied().fold(f64::INFINITY, f64::min),
        xs.iter().copied().fold(0.0, f64::max),
    );
    let (ymin, ymax) = (
        ys.iter().copied().fold(f64::INFINITY, f64::min),
        ys.iter().copied().fold(0.0, f64::max),
    );
    let root = SVGBackend::new(path, (860, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "(b) one invalidation vs number of intervals",
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(
            (xmin / 1.5..xmax * 1.5).log_scale(),
            (ymin / 2.0..ymax * 2.0).log_scale(),
        )
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("intervals in the index (log)")
        .y_desc("time per invalidation (log)")
        .x_label_formatter(&|x| format!("{x:.0e}"))
        .y_label_formatter(&|y| {
            if *y >= 1e6 {
                format!("{:.0} ms", y / 1e6)
            } else if *y >= 1e3 {
                format!("{:.0} us", y / 1e3)
            } else {
                format!("{y:.0} ns")
            }
        })
        .draw()
        .map_err(|e| err(e.to_string()))?;
    for (i, hits) in suite::HIT_COUNTS.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let line: Vec<(f64, f64)> = pts
            .iter()
            .filter(|p| p.hits == *hits)
            .map(|p| (p.n as f64, p.engine_ns))
            .collect();
        let naive: Vec<(f64, f64)> = pts
            .iter()
            .filter(|p| p.hits == *hits)
            .map(|p| (p.n as f64, p.naive_ns))
            .collect();
        chart
            .draw_series(LineSeries::new(line.clone(), colour.stroke_width(3)))
            .map_err(|e| err(e.to_string()))?
            .label(format!("engine, {hits} hit"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(3))
            });
        chart
            .draw_series(line.iter().map(|p| Circle::new(*p, 4, colour.filled())))
            .map_err(|e| err(e.to_string()))?;
        chart
            .draw_series(LineSeries::new(
                naive.clone(),
                colour.mix(0.6).stroke_width(1),
            ))
            .map_err(|e| err(e.to_string()))?
            .label(format!("linear-scan baseline, {hits} hit"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.mix(0.6).stroke_width(1))
            });
        chart
            .draw_series(naive.iter().map(|p| Circle::new(*p, 3, colour.mix(0.6))))
            .map_err(|e| err(e.to_string()))?;
    }
    let hot: Vec<(f64, f64)> = pts
        .iter()
        .filter_map(|p| p.engine_hot_ns.map(|ns| (p.n as f64, ns)))
        .collect();
    if !hot.is_empty() {
        let colour = RGBColor(148, 103, 189);
        chart
            .draw_series(LineSeries::new(hot.clone(), colour.stroke_width(2)))
            .map_err(|e| err(e.to_string()))?
            .label("engine, 1 hit, same range every time (cache-hot)")
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
            });
        chart
            .draw_series(
                hot.iter()
                    .map(|p| Cross::new(*p, 5, colour.stroke_width(2))),
            )
            .map_err(|e| err(e.to_string()))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}

/// Chart (e): throughput with two threads relative to one, per series, with the ideal line.
fn scaling_chart(r: &Report, path: &Path) -> Result<(), String> {
    let err = chart_err(path);
    let root = SVGBackend::new(path, (860, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let ymax = r.scaling.iter().map(|s| s.ratio()).fold(2.0, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "(e) two threads on disjoint ranges vs one (same Mm, 1 subscriber)",
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0.9f64..2.1f64, 0f64..ymax)
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("threads")
        .y_desc("throughput relative to 1 thread")
        .x_labels(3)
        .x_label_formatter(&|x| {
            if (x - x.round()).abs() < 0.01 {
                format!("{x:.0}")
            } else {
                String::new()
            }
        })
        .draw()
        .map_err(|e| err(e.to_string()))?;
    chart
        .draw_series(LineSeries::new(
            vec![(1.0, 1.0), (2.0, 2.0)],
            BLACK.mix(0.4),
        ))
        .map_err(|e| err(e.to_string()))?
        .label("ideal (x2)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.4)));
    chart
        .draw_series(LineSeries::new(
            vec![(0.9, 1.6), (2.1, 1.6)],
            RGBColor(150, 150, 150),
        ))
        .map_err(|e| err(e.to_string()))?
        .label("target (x1.6)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RGBColor(150, 150, 150)));
    for (i, s) in r.scaling.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let pts = vec![(1.0, 1.0), (2.0, s.ratio())];
        chart
            .draw_series(LineSeries::new(pts.clone(), colour.stroke_width(3)))
            .map_err(|e| err(e.to_string()))?
            .label(format!(
                "{}: x{:.2} ({:.2} -> {:.2} M ops/s)",
                s.name,
                s.ratio(),
                s.one / 1e6,
                s.two / 1e6
            ))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(3))
            });
        chart
            .draw_series(pts.iter().map(|p| Circle::new(*p, 4, colour.filled())))
            .map_err(|e| err(e.to_string()))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}
