//! Section 1: apply of a release of big packages: this agent, the curl | tar limit and
//! upstream's pipeline, interleaved.

use super::*;

#[derive(Default)]
pub(crate) struct AgentRuns {
    pub(crate) total_s: Vec<f64>,
    pub(crate) prepare_s: Vec<f64>,
    pub(crate) apply_s: Vec<f64>,
    pub(crate) cpu_s: Vec<f64>,
    pub(crate) peak_rss_kb: Vec<u64>,
    pub(crate) peak_anon_kb: Vec<u64>,
}

#[derive(Default)]
pub(crate) struct ShellRuns {
    pub(crate) wall_s: Vec<f64>,
    pub(crate) cpu_s: Vec<f64>,
}

/// Whether each of `dirs` holds a package's files (all of them, full size).
pub(crate) fn check_unpacked(dirs: &[PathBuf], k: &Knobs, what: &str) -> Res<()> {
    for d in dirs {
        let (n, bytes) = count_files(d);
        let want = (k.package_mb * MIB / FILES_PER_PACKAGE * FILES_PER_PACKAGE) as u64;
        if n != FILES_PER_PACKAGE + 1 || bytes < want {
            return Err(format!(
                "{what}: {} holds {n} files, {bytes} bytes (want {} files, ≥ {want} bytes)",
                d.display(),
                FILES_PER_PACKAGE + 1
            ));
        }
    }
    Ok(())
}

pub(crate) fn clear_agent_installs(w: &World) -> Res<()> {
    let base = w.base();
    for d in ["data/packages", "data/jobs", "packages", "jobs"] {
        empty_dir(&base.join(d))?;
    }
    Ok(())
}

pub(crate) fn run_agent(
    w: &World,
    spec: &Value,
    blobs: &[Blob],
    k: &Knobs,
    runs: &mut AgentRuns,
) -> Res<()> {
    clear_agent_installs(w)?;
    sync_fs(w.sb.dir());
    let pid = w.agent.pid();
    // "5" resets the peak RSS (VmHWM) to the current RSS.
    fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .map_err(|e| format!("resetting VmHWM: {e}"))?;
    let sampler = RssSampler::start(pid, RSS_POLL);
    let cpu0 = cpu_ms(pid);
    let t0 = Instant::now();
    let prepared = w.task("prepare", json!([spec]))?;
    let t1 = Instant::now();
    let applied = w.task("apply", json!([spec]))?;
    let t2 = Instant::now();
    let cpu1 = cpu_ms(pid);
    let hwm = proc_status_kb(pid, "VmHWM:");
    let (rss, anon) = sampler.finish();
    if prepared != json!("prepared") || applied != json!("applied") {
        return Err(format!("prepare → {prepared}, apply → {applied}"));
    }
    let dirs: Vec<PathBuf> = blobs
        .iter()
        .map(|b| w.base().join("packages").join(&b.name))
        .map(|link| fs::canonicalize(&link).unwrap_or(link))
        .collect();
    check_unpacked(&dirs, k, "this agent")?;
    runs.total_s.push((t2 - t0).as_secs_f64());
    runs.prepare_s.push((t1 - t0).as_secs_f64());
    runs.apply_s.push((t2 - t1).as_secs_f64());
    runs.cpu_s.push((cpu1 - cpu0) / 1000.0);
    runs.peak_rss_kb.push(rss.max(hwm));
    runs.peak_anon_kb.push(anon);
    clear_agent_installs(w)?;
    Ok(())
}

pub(crate) fn fresh_dirs(root: &Path, n: usize) -> Res<Vec<PathBuf>> {
    if root.exists() {
        fs::remove_dir_all(root).map_err(|e| e.to_string())?;
    }
    (0..n)
        .map(|i| {
            let d = root.join(format!("{i}"));
            fs::create_dir_all(&d)
                .map(|()| d)
                .map_err(|e| e.to_string())
        })
        .collect()
}

/// Runs one parallel pipeline per blob (`line(i, blob, dir)`) in one shell and waits for all.
pub(crate) fn run_shell(
    w: &World,
    root: &Path,
    blobs: &[Blob],
    k: &Knobs,
    what: &str,
    line: impl Fn(usize, &Blob, &Path) -> String,
    runs: &mut ShellRuns,
) -> Res<()> {
    let dirs = fresh_dirs(root, blobs.len())?;
    sync_fs(w.sb.dir());
    let mut script = String::from("fail=0\n");
    for (i, (b, d)) in blobs.iter().zip(&dirs).enumerate() {
        script.push_str(&format!("( {} ) & p{i}=$!\n", line(i, b, d)));
    }
    for i in 0..blobs.len() {
        script.push_str(&format!("wait $p{i} || fail=1\n"));
    }
    script.push_str("exit $fail\n");
    let c0 = children_cpu_ms();
    let took = w.shell(&script).map_err(|e| format!("{what}: {e}"))?;
    let c1 = children_cpu_ms();
    check_unpacked(&dirs, k, what)?;
    runs.wall_s.push(took.as_secs_f64());
    runs.cpu_s.push((c1 - c0) / 1000.0);
    fs::remove_dir_all(root).map_err(|e| e.to_string())?;
    Ok(())
}

pub(crate) struct VariantResult {
    pub(crate) variant: Variant,
    pub(crate) tgz_total: u64,
    pub(crate) a: AgentRuns,
    pub(crate) b: ShellRuns,
    pub(crate) c: ShellRuns,
}

pub(crate) fn apply_variant(w: &World, v: Variant, k: &Knobs) -> Res<VariantResult> {
    eprintln!(
        "bench-deploy: building {} packages of {} MB, {}",
        k.packages,
        k.package_mb,
        v.label()
    );
    let blobs = build_blobs(w, v, k)?;
    let archive = templates(w)?;
    let tgz_total = blobs.iter().map(|b| b.size).sum();
    let (mut a, mut b, mut c) = (
        AgentRuns::default(),
        ShellRuns::default(),
        ShellRuns::default(),
    );
    let auth = w.curl_auth();
    let b_root = w.sb.dir().join("limit");
    let c_root = w.sb.dir().join("upstream");
    let c_files = w.sb.dir().join("upstream-downloads");
    // A warm-up of each, so that nginx's and the page cache's first touch is in no figure.
    let mut warm_a = AgentRuns::default();
    let mut warm_s = ShellRuns::default();
    let curl_tar = |_: usize, blob: &Blob, d: &Path| {
        format!(
            "curl -s {auth} '{}' | tar -xz -C '{}'",
            w.url(&blob.id),
            d.display()
        )
    };
    let upstream = |i: usize, blob: &Blob, d: &Path| {
        let f = c_files.join(format!("{i}.tgz"));
        let f = f.display();
        format!(
            "curl -s {auth} -o '{f}' '{}' && [ \"$(sha1sum '{f}' | cut -c1-40)\" = {} ] \
             && tar --no-same-owner -xzf '{f}' -C '{}' && rm -f '{f}'",
            w.url(&blob.id),
            blob.sha1,
            d.display()
        )
    };
    fs::create_dir_all(&c_files).map_err(|e| e.to_string())?;
    eprintln!("bench-deploy: warm-up");
    run_agent(
        w,
        &apply_spec(&blobs, &archive, "warm"),
        &blobs,
        k,
        &mut warm_a,
    )?;
    run_shell(w, &b_root, &blobs, k, "curl | tar", curl_tar, &mut warm_s)?;
    run_shell(w, &c_root, &blobs, k, "upstream", upstream, &mut warm_s)?;
    for round in 0..k.rounds {
        eprintln!("bench-deploy: {} round {}", v.prefix(), round + 1);
        // The order turns each round so that drift on a shared machine hits all alike.
        for step in 0..3 {
            match (round + step) % 3 {
                0 => {
                    let spec = apply_spec(&blobs, &archive, &format!("cfg-{round}"));
                    run_agent(w, &spec, &blobs, k, &mut a)?;
                }
                1 => run_shell(w, &b_root, &blobs, k, "curl | tar", curl_tar, &mut b)?,
                _ => run_shell(w, &c_root, &blobs, k, "upstream", upstream, &mut c)?,
            }
        }
    }
    fs::remove_dir_all(&c_files).map_err(|e| e.to_string())?;
    for blob in &blobs {
        let _ = fs::remove_file(w.dav.object_path(&blob.id));
    }
    Ok(VariantResult {
        variant: v,
        tgz_total,
        a,
        b,
        c,
    })
}

pub(crate) fn print_apply(results: &[VariantResult], k: &Knobs) {
    println!(
        "\n## Apply of {} packages × {} MB from the nginx DAV blobstore (TLS, Basic auth), cold; median of {} rounds, interleaved (s)\n",
        k.packages, k.package_mb, k.rounds
    );
    println!(
        "A = this agent, `prepare` then `apply` (first request → `apply`'s task result; `env.bosh.parallel` 5); \
         B = the limit, `curl -s | tar -xz` per blob, all at once, verifying nothing; \
         C = upstream's pipeline: `curl -o` file, `sha1sum` it, `tar --no-same-owner -xzf`, remove the file, per blob, all at once. \
         Blobs page-cache warm in nginx's store for all three.\n"
    );
    println!(
        "| variant (tgz total) | A: prepare + apply | A: prepare / apply | B: limit | C: upstream pipeline | speed relative to the limit B/A (target ≥ 0.85) | B / A's prepare alone | C/A (target ≥ 1.3) | C / A's prepare alone | A peak RSS (target ≤ 32 MB) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in results {
        let (a, p, ap, b, c) = (
            median(&r.a.total_s),
            median(&r.a.prepare_s),
            median(&r.a.apply_s),
            median(&r.b.wall_s),
            median(&r.c.wall_s),
        );
        let peak = r.a.peak_rss_kb.iter().copied().max().unwrap_or(0);
        println!(
            "| {} ({:.1} MB) | {a:.3} | {p:.3} / {ap:.3} | {b:.3} | {c:.3} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} MB |",
            r.variant.label(),
            r.tgz_total as f64 / 1e6,
            b / a,
            b / p,
            c / a,
            c / p,
            mb(peak)
        );
    }
    println!(
        "\n| variant | samples A (total; prepare) | samples B | samples C | CPU s (user + sys), median: A agent / B pipelines / C pipelines | A peak RSS per run (VmHWM) / peak RssAnon sampled |"
    );
    println!("|---|---|---|---|---|---|");
    for r in results {
        let hwm: Vec<String> =
            r.a.peak_rss_kb
                .iter()
                .map(|kb| format!("{:.1}", mb(*kb)))
                .collect();
        let anon: Vec<String> =
            r.a.peak_anon_kb
                .iter()
                .map(|kb| format!("{:.1}", mb(*kb)))
                .collect();
        println!(
            "| {} | {}; {} | {} | {} | {:.2} / {:.2} / {:.2} | {} / {} MB |",
            r.variant.prefix(),
            list(&r.a.total_s, 3),
            list(&r.a.prepare_s, 3),
            list(&r.b.wall_s, 3),
            list(&r.c.wall_s, 3),
            median(&r.a.cpu_s),
            median(&r.b.cpu_s),
            median(&r.c.cpu_s),
            hwm.join(", "),
            anon.join(", ")
        );
    }
    println!(
        "\n`apply` after `prepare` installs nothing: it enables, writes the monit file and reloads monit; the agent \
         confirms the reload by monit's incarnation, checked every 100 ms. B and C do no such step.\n"
    );
    println!(
        "CPU of B and C counts curl, tar, gzip and sha1sum (waited-for children); nginx's CPU (TLS) is in none of the columns. The agent's CPU is 10 ms ticks."
    );
}
