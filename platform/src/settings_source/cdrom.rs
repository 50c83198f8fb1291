//! `CDROM` (vSphere): the file `FileName` (`env`) on the disc the CPI attaches, as upstream:
//! wait until the drive is readable, let udev settle, mount it (read-only here), read the
//! file, unmount, and eject the disc, so that the settings (credentials among them) are not
//! left readable to the `cdrom` group, which vcap is in on stemcells. A disc that will not
//! eject fails the source, as upstream's.

use std::fs::File;
use std::io::Read;
use std::process::Command;

use serde_json::Value;

use super::Context;
use super::error::FetchError;
use super::mount::{ReadOnlyMount, inside};
use super::options::CdromOptions;
use super::retry::Verdict;
use super::user_data::settings_document;

/// The settings in `FileName` on the CD-ROM ([`Context::cdrom_device`]).
pub fn settings(options: &CdromOptions, ctx: &Context) -> Result<Value, FetchError> {
    if options.file_name.is_empty() {
        return Err(FetchError::Config("FileName is empty".into()));
    }
    let device = &ctx.cdrom_device;
    let cd_error = |detail: String| FetchError::Cdrom {
        device: device.clone(),
        detail,
    };
    // Reading a byte also makes the kernel notice a medium that was just inserted.
    ctx.cdrom_wait.run(&device.display().to_string(), |_| {
        let mut b = [0u8; 1];
        match File::open(device).and_then(|mut f| f.read(&mut b)) {
            Ok(1) => Ok(()),
            Ok(_) => Err(Verdict::Retry(cd_error("no medium (reads nothing)".into()))),
            Err(e) => Err(Verdict::Retry(cd_error(format!("not readable: {e}")))),
        }
    })?;
    settle_udev();
    let mount = ReadOnlyMount::new(device, &ctx.scratch_dir)?;
    let path = inside(mount.dir(), &options.file_name)?;
    let read = std::fs::read(&path).map_err(|source| FetchError::Read {
        path: device.join(&options.file_name),
        source,
    });
    let unmounted = mount.unmount();
    let bytes = read?;
    unmounted?;
    if ctx.cdrom_eject {
        let out = Command::new("eject")
            .arg(device)
            .output()
            .map_err(|e| cd_error(format!("running eject: {e}")))?;
        if !out.status.success() {
            return Err(cd_error(format!(
                "eject {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    }
    settings_document(
        &bytes,
        &format!("{}:{}", device.display(), options.file_name),
    )
}

/// `udevadm settle`, where udev runs; its absence is not an error here (upstream's is).
fn settle_udev() {
    match Command::new("udevadm")
        .args(["settle", "--timeout=10"])
        .output()
    {
        Ok(out) if !out.status.success() => tracing::debug!(
            status = %out.status,
            "udevadm settle failed; reading the CD-ROM anyway"
        ),
        Ok(_) => {}
        Err(e) => tracing::debug!(error = %e, "no udevadm; reading the CD-ROM anyway"),
    }
}
