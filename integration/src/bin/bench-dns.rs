//! `sync_dns`'s own work for a 10,000-record blob (version check, parse and checks, hosts file
//! and records.json written with their fsyncs), against the director's budget: it waits 10 s
//! in all for every agent to answer `"synced"`. Knobs: `BENCH_RECORDS` (10000), `BENCH_ROUNDS`
//! (7). Prints the median and the range.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use integration::TempDir;

fn knob(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let records = knob("BENCH_RECORDS", 10_000);
    let rounds = knob("BENCH_ROUNDS", 7).max(1);
    let mut times: Vec<Duration> = Vec::new();
    for _ in 0..rounds {
        let dir = TempDir::new("bench-dns").unwrap();
        times.push(platform::dns::bench_sync_dns(dir.path(), records).unwrap());
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("## sync_dns of a {records}-record blob (after the fetch; {rounds} rounds)");
    println!();
    println!("| median | min | max | director's budget | share of the budget |");
    println!("|---|---|---|---|---|");
    let median = times[times.len() / 2];
    println!(
        "| {:.1} ms | {:.1} ms | {:.1} ms | 10 s | {:.2} % |",
        ms(median),
        ms(times[0]),
        ms(times[times.len() - 1]),
        median.as_secs_f64() / 10.0 * 100.0
    );
}
