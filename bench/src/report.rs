//! Markdown for people: the comparison table, the targets, the notes.

use std::fmt::Write as _;

use crate::compare::Report;
use crate::load::{HttpReport, TcpReport};

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.filter(|x| x.is_finite()).map_or_else(|| "–".into(), f)
}

fn list(v: &[f64], digits: usize) -> String {
    if v.is_empty() {
        return "–".into();
    }
    v.iter()
        .map(|x| {
            if x.is_finite() {
                format!("{x:.digits$}")
            } else {
                "?".into()
            }
        })
        .collect::<Vec<_>>()
        .join(" / ")
}

pub fn compare_markdown(r: &Report) -> String {
    let s = &r.settings;
    let mut m = String::new();
    let _ = writeln!(
        m,
        "### weft-bench compare: {} round(s) × {:.1} s per run, {} HTTP/1.1 connections, {} B responses, {} worker thread(s) per proxy, backend: {}\n",
        s.rounds,
        s.duration_s,
        s.connections,
        s.body_size,
        s.workers,
        if s.nginx.is_some() {
            "nginx (no bulk test)"
        } else {
            "built-in"
        }
    );
    let _ = writeln!(
        m,
        "Machine: {} × {}, Linux {}; load average before {} / after {}.\n",
        r.machine.cpus,
        r.machine.cpu,
        r.machine.kernel,
        r.machine.loadavg_before,
        r.machine.loadavg_after
    );
    let mut header =
        String::from("| scenario | req/s (closed loop) | vs direct | p50 / p99 closed loop (ms) |");
    let mut rule = String::from("|---|---:|---:|---:|");
    for rate in &s.rates {
        let _ = write!(
            header,
            " p50 / p99 @{rate} req/s (ms) | added p99 @{rate} |"
        );
        rule.push_str("---:|---:|");
    }
    let first = s.rates.first().copied();
    if let Some(rate) = first {
        let _ = write!(header, " CPU s per 1k req @{rate} (client / server) |");
        rule.push_str("---:|");
    }
    header.push_str(
        " CPU s per 1k req closed loop | idle RSS MiB (anonymous) | peak RSS MiB | bulk Gbit/s | vs direct |",
    );
    rule.push_str("---:|---:|---:|---:|---:|");
    let _ = writeln!(m, "{header}\n{rule}");
    for sc in &r.scenarios {
        if let Some(why) = &sc.skipped {
            let _ = writeln!(m, "| {} | skipped: {why} |", sc.name);
            continue;
        }
        let mut row = format!(
            "| {} | {} | {} | {} |",
            sc.name,
            opt(sc.closed_rps, |x| format!("{x:.0}")),
            opt(sc.closed_vs_direct, |x| format!("{x:.2}×")),
            sc.closed_latency.map_or("–".into(), |l| format!(
                "{:.3} / {:.3}",
                l.p50_ms, l.p99_ms
            )),
        );
        for rate in &s.rates {
            let rs = sc.rates.iter().find(|x| (x.rate - rate).abs() < 1e-9);
            let _ = write!(
                row,
                " {} | {} |",
                rs.map_or("–".into(), |x| format!(
                    "{:.3} / {:.3}",
                    x.latency.p50_ms, x.latency.p99_ms
                )),
                opt(rs.and_then(|x| x.added_p99_ms), |x| format!("{x:+.3}"))
            );
        }
        if first.is_some() {
            let cpu = sc
                .rates
                .first()
                .map_or(Vec::new(), |x| x.cpu_s_per_1k.clone());
            let _ = write!(row, " {} |", list(&cpu, 3));
        }
        let idle = if sc.proxies.is_empty() {
            "–".to_string()
        } else {
            sc.proxies
                .iter()
                .map(|p| format!("{:.1} ({:.1})", p.idle_rss_mib, p.idle_rss_anon_mib))
                .collect::<Vec<_>>()
                .join(" / ")
        };
        let peak: Vec<f64> = sc.proxies.iter().map(|p| p.peak_rss_mib).collect();
        let _ = writeln!(
            row,
            " {} | {} | {} | {} | {} |",
            list(&sc.closed_cpu_s_per_1k, 3),
            idle,
            list(&peak, 1),
            opt(sc.bulk_gbit_per_s, |x| format!("{x:.2}")),
            opt(sc.bulk_vs_direct, |x| format!("{x:.2}×")),
        );
        m.push_str(&row);
    }
    let _ = writeln!(
        m,
        "\nMedians over rounds; \"vs direct\" and \"added\" are medians of per-round comparisons with direct \
         (runs alternate between scenarios, so both saw the same machine). Latency at a fixed rate is measured \
         from each request's scheduled send time (open loop, no coordinated omission). CPU is utime + stime \
         of each proxy process from /proc over the run; two numbers are client-side / server-side proxy.\n"
    );
    let _ = writeln!(m, "| target | goal | measured | met |\n|---|---|---|---|");
    for t in &r.targets {
        let _ = writeln!(
            m,
            "| {} | {} | {} | {} |",
            t.what,
            t.goal,
            t.measured.clone().unwrap_or_else(|| "not measured".into()),
            match t.met {
                Some(true) => "yes",
                Some(false) => "no",
                None => "–",
            }
        );
    }
    let mut notes = Vec::new();
    for sc in &r.scenarios {
        if let Some(why) = &sc.skipped {
            notes.push(format!("{} skipped: {why}", sc.name));
        }
        if sc.errors > 0 {
            notes.push(format!(
                "{}: {} failed requests/streams; first: {}",
                sc.name,
                sc.errors,
                sc.first_error.clone().unwrap_or_default()
            ));
        }
    }
    if !notes.is_empty() {
        let _ = writeln!(m, "\nNotes:");
        for n in notes {
            let _ = writeln!(m, "- {n}");
        }
    }
    m
}

pub fn http_text(r: &HttpReport) -> String {
    let l = &r.latency;
    let mut s = format!(
        "{:?}: {} connections × {} in flight, {}\n  {} requests in {:.2} s = {:.0} req/s, {} errors\n  latency ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  mean {:.3}\n",
        r.mode,
        r.connections,
        r.concurrency,
        r.rate.map_or("closed loop".into(), |x| format!("open loop at {x} req/s (latency from scheduled send)")),
        r.requests,
        r.duration_s,
        r.rps,
        r.errors,
        l.p50_ms,
        l.p90_ms,
        l.p99_ms,
        l.p999_ms,
        l.max_ms,
        l.mean_ms
    );
    if let Some(e) = &r.first_error {
        let _ = writeln!(s, "  first error: {e}");
    }
    s
}

pub fn tcp_text(r: &TcpReport) -> String {
    let mut s = format!(
        "TCP bulk: {} streams, {} bytes in {:.2} s = {:.2} Gbit/s, {} errors\n",
        r.streams, r.bytes, r.duration_s, r.gbit_per_s, r.errors
    );
    if let Some(e) = &r.first_error {
        let _ = writeln!(s, "  first error: {e}");
    }
    s
}
