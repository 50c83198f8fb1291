//! The release under test: packages of either variant as tgz blobs in nginx's store, the
//! job's templates and the apply spec.

use super::*;

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Variant {
    Text,
    Random,
}

impl Variant {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Variant::Text => "compressible (numbered text lines)",
            Variant::Random => "incompressible (/dev/urandom)",
        }
    }
    pub(crate) fn prefix(self) -> &'static str {
        match self {
            Variant::Text => "text",
            Variant::Random => "rand",
        }
    }
}

pub(crate) struct Blob {
    pub(crate) name: String,
    pub(crate) id: String,
    pub(crate) sha1: String,
    pub(crate) size: u64,
}

/// Writes the package's files and packs them with the system's `tar -czf` (entries `./…`,
/// as the director's blobs); returns the tgz path.
pub(crate) fn make_package(
    dir: &Path,
    v: Variant,
    index: usize,
    bytes: usize,
) -> Res<(PathBuf, PathBuf)> {
    let root = dir.join(format!("{}{index}", v.prefix()));
    fs::create_dir_all(root.join("lib")).map_err(|e| format!("mkdir: {e}"))?;
    let per_file = bytes / FILES_PER_PACKAGE;
    let mut urandom = fs::File::open("/dev/urandom").map_err(|e| format!("/dev/urandom: {e}"))?;
    let mut chunk = vec![0u8; MIB];
    for f in 0..FILES_PER_PACKAGE {
        let path = root.join("lib").join(format!("part-{f:02}.bin"));
        let mut out = std::io::BufWriter::with_capacity(
            MIB,
            fs::File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?,
        );
        let mut left = per_file;
        let mut line_no = 0u64;
        while left > 0 {
            let n = match v {
                Variant::Random => {
                    let n = left.min(chunk.len());
                    urandom
                        .read_exact(&mut chunk[..n])
                        .map_err(|e| format!("/dev/urandom: {e}"))?;
                    out.write_all(&chunk[..n]).map(|()| n)
                }
                // Numbered lines: varying digits keep gzip from the ~1000:1 of a block
                // repeated verbatim, closer to real text.
                Variant::Text => {
                    let line = format!(
                        "{line_no:010} package {index} file {f}: deploy benchmark text, mostly the same words\n"
                    );
                    line_no += 1;
                    let n = line.len().min(left);
                    out.write_all(&line.as_bytes()[..n]).map(|()| n)
                }
            }
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
            left -= n;
        }
        out.flush()
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    fs::write(root.join("bin-version"), format!("{index}\n")).map_err(|e| e.to_string())?;
    let tgz = dir.join(format!("{}{index}.tgz", v.prefix()));
    Ok((root, tgz))
}

pub(crate) fn build_blobs(w: &World, v: Variant, k: &Knobs) -> Res<Vec<Blob>> {
    let gen_dir = w.sb.dir().join(format!("gen-{}", v.prefix()));
    fs::create_dir_all(&gen_dir).map_err(|e| e.to_string())?;
    let mut packs = Vec::new();
    for i in 0..k.packages {
        packs.push(make_package(&gen_dir, v, i, k.package_mb * MIB)?);
    }
    // The system's tar, all at once (gzip of random data is slow).
    let mut children = Vec::new();
    for (root, tgz) in &packs {
        children.push(
            Command::new("tar")
                .arg("-czf")
                .arg(tgz)
                .arg("-C")
                .arg(root)
                .arg(".")
                .stdin(Stdio::null())
                .spawn()
                .map_err(|e| format!("tar: {e}"))?,
        );
    }
    for mut c in children {
        let st = c.wait().map_err(|e| format!("tar: {e}"))?;
        if !st.success() {
            return Err(format!("tar -czf failed: {st}"));
        }
    }
    let mut blobs = Vec::new();
    for (i, (_, tgz)) in packs.iter().enumerate() {
        let bytes = fs::read(tgz).map_err(|e| format!("{}: {e}", tgz.display()))?;
        let id = w.upload(&bytes)?;
        blobs.push(Blob {
            name: format!("{}{i}", v.prefix()),
            id,
            sha1: sha1_hex(&bytes),
            size: bytes.len() as u64,
        });
    }
    fs::remove_dir_all(&gen_dir).map_err(|e| e.to_string())?;
    Ok(blobs)
}

pub(crate) fn tgz_of(dir: &Path, files: &[(&str, String, u32)]) -> Res<Vec<u8>> {
    let root = dir.join("root");
    for (path, body, mode) in files {
        let p = root.join(path);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).map_err(|e| e.to_string())?;
        }
        fs::write(&p, body).map_err(|e| e.to_string())?;
        fs::set_permissions(&p, fs::Permissions::from_mode(*mode)).map_err(|e| e.to_string())?;
    }
    let out = dir.join("out.tgz");
    run_ok(
        Command::new("tar")
            .arg("-czf")
            .arg(&out)
            .arg("-C")
            .arg(&root)
            .arg("."),
        "tar -czf",
    )?;
    let bytes = fs::read(&out).map_err(|e| e.to_string())?;
    fs::remove_dir_all(&root).map_err(|e| e.to_string())?;
    fs::remove_file(&out).map_err(|e| e.to_string())?;
    Ok(bytes)
}

/// The rendered templates archive: job `web` whose monit file watches a file (monit never
/// starts anything for it).
pub(crate) fn templates(w: &World) -> Res<(String, String)> {
    let dir = w.sb.dir().join("gen-templates");
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let monit = format!(
        "check file bench_web with path {}/jobs/web/monit\n  group vcap\n",
        w.base().display()
    );
    let bytes = tgz_of(&dir, &[("web/monit", monit, 0o644)])?;
    fs::remove_dir_all(&dir).map_err(|e| e.to_string())?;
    let id = w.upload(&bytes)?;
    Ok((id, sha1_hex(&bytes)))
}

pub(crate) fn apply_spec(blobs: &[Blob], archive: &(String, String), config_hash: &str) -> Value {
    let packages: serde_json::Map<String, Value> = blobs
        .iter()
        .map(|b| {
            (
                b.name.clone(),
                json!({"name": b.name, "version": "1", "sha1": b.sha1, "blobstore_id": b.id}),
            )
        })
        .collect();
    integration::sim::apply_spec_with(
        Value::Object(packages),
        (&archive.0, &archive.1),
        config_hash,
    )
}
