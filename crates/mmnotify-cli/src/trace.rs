//! Chrome trace-event export of the simulator's event log (opens in ui.perfetto.dev).
//!
//! One *process* per scenario run (scenario × policy), one *thread* (track) per subscriber,
//! plus a `primary` track for the simulated operations. Each classic `start..end` window is a
//! complete slice (`ph: "X"`); starts are paired with ends of the same subscriber and range
//! in order. A start that never got its end becomes a slice running to the end of the run,
//! named `start (no end)`; an end without a start (Linux ≥ 5.12 ending a refuser) is an
//! instant named `end without start`. Refusals, interval callbacks, releases and
//! secondary-TLB flushes are instants.

use std::collections::{HashMap, VecDeque};

use mmnotify_sim::{ScenarioReport, TraceEvent, TraceKind};
use serde_json::{json, Value};

/// The trace-event JSON object (`{"traceEvents": [...]}`) for these runs.
pub(crate) fn chrome_trace(reports: &[ScenarioReport]) -> Value {
    let mut events = Vec::new();
    for (run, report) in reports.iter().enumerate() {
        let name = format!("{} / {}", report.scenario.name(), report.policy.name());
        push_run(&mut events, run + 1, &name, &report.trace);
    }
    json!({ "traceEvents": events, "displayTimeUnit": "ms" })
}

/// The trace-event JSON object for one event log (e.g. a torture run's), as one process.
pub(crate) fn chrome_trace_events(name: &str, trace: &[TraceEvent]) -> Value {
    let mut events = Vec::new();
    push_run(&mut events, 1, name, trace);
    json!({ "traceEvents": events, "displayTimeUnit": "ms" })
}

/// Appends one run's process, tracks and slices.
fn push_run(events: &mut Vec<Value>, pid: usize, name: &str, trace: &[TraceEvent]) {
    events.push(json!({
        "ph": "M", "pid": pid, "name": "process_name",
        "args": { "name": name }
    }));
    let mut tids: HashMap<String, usize> = HashMap::new();
    let mut tid_of = |name: &str, events: &mut Vec<Value>| -> usize {
        if let Some(&tid) = tids.get(name) {
            return tid;
        }
        let tid = tids.len() + 1;
        events.push(json!({
            "ph": "M", "pid": pid, "tid": tid, "name": "thread_name",
            "args": { "name": name }
        }));
        tids.insert(name.to_owned(), tid);
        tid
    };
    let end_of_run = trace.last().map_or(0, |e| e.ts_us);
    let mut open: HashMap<(String, u64, u64), VecDeque<u64>> = HashMap::new();
    for e in trace {
        let track = if e.kind == TraceKind::Operation {
            "primary"
        } else {
            e.subscriber.as_str()
        };
        let tid = tid_of(track, events);
        let args = json!({
            "range": e.range.to_string(),
            "event": e.event.map(|ev| format!("{ev:?}")),
            "blockable": e.blockable,
        });
        let key = (e.subscriber.clone(), e.range.start(), e.range.end());
        match e.kind {
            TraceKind::Start => open.entry(key).or_default().push_back(e.ts_us),
            TraceKind::End => match open.get_mut(&key).and_then(VecDeque::pop_front) {
                Some(start) => events.push(json!({
                    "ph": "X", "pid": pid, "tid": tid, "name": "invalidate",
                    "ts": start, "dur": e.ts_us.saturating_sub(start).max(1), "args": args
                })),
                None => events.push(instant(pid, tid, "end without start", e.ts_us, args)),
            },
            TraceKind::Refused => events.push(instant(pid, tid, "refused", e.ts_us, args)),
            TraceKind::IntervalInvalidate => {
                events.push(instant(pid, tid, "interval invalidate", e.ts_us, args))
            }
            TraceKind::Release => events.push(instant(pid, tid, "release", e.ts_us, args)),
            TraceKind::SecondaryTlb => {
                events.push(instant(pid, tid, "secondary TLB flush", e.ts_us, args))
            }
            TraceKind::Operation => events.push(instant(pid, tid, &e.subscriber, e.ts_us, args)),
        }
    }
    let mut unpaired: Vec<_> = open
        .into_iter()
        .flat_map(|((name, start, end), starts)| {
            starts
                .into_iter()
                .map(move |ts| (name.clone(), start, end, ts))
        })
        .collect();
    unpaired.sort();
    for (name, start, end, ts) in unpaired {
        let tid = tid_of(&name, events);
        events.push(json!({
            "ph": "X", "pid": pid, "tid": tid, "name": "start (no end)",
            "ts": ts, "dur": end_of_run.saturating_sub(ts).max(1),
            "args": { "range": format!("[{start:#x}, {end:#x})"), "unpaired": true }
        }));
    }
}

fn instant(pid: usize, tid: usize, name: &str, ts: u64, args: Value) -> Value {
    json!({ "ph": "i", "s": "t", "pid": pid, "tid": tid, "name": name, "ts": ts, "args": args })
}
