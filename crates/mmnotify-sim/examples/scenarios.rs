//! Prints every scenario under every policy (a quick look; the tests assert).
use mmnotify_sim::{run, Policy, Scenario};
fn main() {
    for sc in Scenario::ALL {
        for p in [Policy::Exact, Policy::Kernel, Policy::Legacy] {
            let t = std::time::Instant::now();
            let r = run(sc, p);
            print!("{r}");
            println!("  ({:?}, {} trace events)", t.elapsed(), r.trace.len());
        }
    }
}
