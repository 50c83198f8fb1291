//! The copy of `migrate_disk`: everything on the old store onto the new disk.
//!
//! Upstream pipes `tar --xattrs --xattrs-include=*.* --sparse -c` into `tar --xattrs -xp`
//! through `sh -c`. This agent runs one `cp -a -T <old> <new>` instead:
//!
//! - one process, so its exit status covers reading *and* writing (in upstream's pipeline only
//!   the extracting tar's status is seen: a read error on the old disk goes unnoticed);
//! - `-a` keeps owners, modes, timestamps, symlinks, hard links, xattrs (capabilities, ACLs,
//!   SELinux labels where present); holes are kept (`--sparse=auto`, the default, finds them
//!   with `SEEK_HOLE`);
//! - `-T` copies the contents into the existing mount point, including the root directory's
//!   own owner and mode (tar's `.` entry does the same);
//! - no shell, so no quoting of paths.

use std::path::Path;

use super::DiskError;
use super::runner::{Tool, Tools};

/// Copies the tree at `from` into the existing directory `to`, preserving everything `cp -a`
/// preserves (see the module documentation).
pub fn copy_tree(tools: &Tools, from: &Path, to: &Path) -> Result<(), DiskError> {
    tools
        .run(
            Tool::Cp,
            &[
                "-a",
                "--sparse=auto",
                "-T",
                &from.to_string_lossy(),
                &to.to_string_lossy(),
            ],
        )
        .map(|_| ())
}
