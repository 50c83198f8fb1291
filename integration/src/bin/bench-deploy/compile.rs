//! Section 2: `compile_package`, the agent's wall time beside the time inside `packaging`.

use super::*;

pub(crate) struct CompileRun {
    pub(crate) wall: f64,
    pub(crate) before: f64,
    pub(crate) packaging: f64,
    pub(crate) after: f64,
}

pub(crate) fn epoch_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

pub(crate) fn compile_section(w: &World, k: &Knobs) -> Res<Vec<(String, Vec<CompileRun>)>> {
    let stamps = w.sb.dir().join("stamps");
    fs::create_dir_all(&stamps).map_err(|e| e.to_string())?;
    let gen_dir = w.sb.dir().join("gen-compile");
    fs::create_dir_all(&gen_dir).map_err(|e| e.to_string())?;
    let payload: String = (0..2000)
        .map(|i| format!("{i:06} payload line of the small package\n"))
        .collect();
    let mut out = Vec::new();
    for (label, extra) in [
        ("copy a 76 kB file", ""),
        ("copy a 76 kB file + `sleep 0.2`", "sleep 0.2\n"),
    ] {
        let packaging = format!(
            "set -e\n\
             date +%s.%N > {s}/start\n\
             cp payload.txt \"$BOSH_INSTALL_TARGET/\"\n\
             {extra}\
             date +%s.%N > {s}/end\n",
            s = stamps.display()
        );
        let src = tgz_of(
            &gen_dir,
            &[
                ("packaging", packaging, 0o644),
                ("payload.txt", payload.clone(), 0o644),
            ],
        )?;
        let sha = sha1_hex(&src);
        let mut runs = Vec::new();
        // One unmeasured run first, as for the apply.
        for n in 0..=k.compile_runs {
            let id = w.upload(&src)?;
            let version = format!("{}.{n}", if extra.is_empty() { 1 } else { 2 });
            let t0 = epoch_now();
            let v = w.task("compile_package", json!([id, sha, "small", version, {}]))?;
            let t1 = epoch_now();
            if v["result"]["blobstore_id"].as_str().is_none() {
                return Err(format!("compile_package → {v}"));
            }
            let read = |f: &str| -> Res<f64> {
                fs::read_to_string(stamps.join(f))
                    .map_err(|e| format!("stamp {f}: {e}"))?
                    .trim()
                    .parse()
                    .map_err(|e| format!("stamp {f}: {e}"))
            };
            let (s, e) = (read("start")?, read("end")?);
            if n > 0 {
                runs.push(CompileRun {
                    wall: t1 - t0,
                    before: s - t0,
                    packaging: e - s,
                    after: t1 - e,
                });
            }
            let _ = fs::remove_file(w.dav.object_path(&id));
        }
        out.push((label.to_string(), runs));
    }
    fs::remove_dir_all(&gen_dir).map_err(|e| e.to_string())?;
    Ok(out)
}

pub(crate) fn print_compile(results: &[(String, Vec<CompileRun>)]) {
    println!(
        "\n## `compile_package` of a small package (median of {} runs after one unmeasured; ms)\n",
        results.first().map_or(0, |r| r.1.len())
    );
    println!(
        "`packaging` = between the script's first and last `date` (its own timestamps); before = from the request to that first \
         `date` (fetch + unpack of the source, `bash -x packaging` started); after = from the last `date` to the task result seen \
         by the director (the script's exit, `tar -czf` of the compiled package, sha1, PUT to nginx, `get_task` polled every {} ms).\n",
        TASK_POLL.as_millis()
    );
    println!(
        "| package | agent wall, whole task (min–max) | inside `packaging` | before packaging | after packaging | agent's own share (wall − packaging) |"
    );
    println!("|---|---|---|---|---|---|");
    for (label, runs) in results {
        let col = |f: fn(&CompileRun) -> f64| -> Vec<f64> {
            runs.iter().map(|r| f(r) * 1000.0).collect()
        };
        let wall = col(|r| r.wall);
        let s = sorted(&wall);
        println!(
            "| {label} | {:.1} ({:.1}–{:.1}) | {:.1} | {:.1} | {:.1} | {:.1} |",
            median(&wall),
            s.first().copied().unwrap_or(f64::NAN),
            s.last().copied().unwrap_or(f64::NAN),
            median(&col(|r| r.packaging)),
            median(&col(|r| r.before)),
            median(&col(|r| r.after)),
            median(&col(|r| r.wall - r.packaging)),
        );
    }
}
