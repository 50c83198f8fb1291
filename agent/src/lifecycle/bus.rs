//! The director link's configuration at start: which mbus configurations the bus may use,
//! in order (the persisted `update_settings`, the mbus that last connected, the settings
//! alone), each checked as [`mbus::Bus::connect`] checks it, and how names are resolved.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use mbus::{MbusConfig, ResolverSource};
use serde_json::Value;
use tracing::{error, info, warn};

use crate::director::actions::update_settings::last_connected_path;
use crate::director::mbus_fallback::{self, Candidate, Candidates};
use crate::settings::Settings;

/// What the bus starts on, with its fallbacks.
pub struct BusPlan {
    /// The first configuration.
    pub cfg: MbusConfig,
    /// Every candidate, for the fallback supervisor and `update_settings`.
    pub candidates: Arc<Candidates>,
}

/// The candidates, in order: the persisted `update_settings` (upstream's precedence), the
/// mbus that last connected (when it differs), and the settings alone (when nothing connected
/// before). `Err` says why the bus cannot start.
pub fn plan(
    settings: &Settings,
    base_dir: &Path,
    update_settings: Option<&Value>,
) -> Result<BusPlan, String> {
    let doc = settings.document();
    let mut list: Vec<Candidate> = Vec::new();
    if let Some(u) = update_settings {
        match mbus_fallback::candidate(doc, Some(u), "update_settings.json") {
            Ok(c) => list.push(c),
            Err(why) => warn!(error = %why, "the persisted update_settings give no usable mbus"),
        }
    }
    let mut have_last = false;
    let last_path = last_connected_path(base_dir);
    if let Some(d) = std::fs::read(&last_path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
    {
        match mbus_fallback::candidate(doc, Some(&d), "mbus_last_connected.json") {
            Ok(c) => {
                have_last = true;
                if list.iter().all(|x| x.cfg != c.cfg) {
                    list.push(c);
                }
            }
            Err(why) => {
                warn!(error = %why, path = %last_path.display(), "the recorded mbus is not usable")
            }
        }
    }
    match mbus_fallback::candidate(doc, None, "settings") {
        Ok(c) if !have_last && list.iter().all(|x| x.cfg != c.cfg) => list.push(c),
        Ok(_) => {}
        Err(e) if list.is_empty() => return Err(format!("settings have no usable mbus: {e}")),
        Err(e) => warn!(error = %e, "the settings alone give no usable mbus"),
    }
    let Some(cfg) = list.first().map(|c| c.cfg.clone()) else {
        return Err("no usable mbus configuration".into());
    };
    if list.len() > 1 {
        info!(
            first = list[0].origin,
            fallbacks = list.len() - 1,
            "mbus: starting with the newest configuration, with a fallback"
        );
    }
    for s in &cfg.skipped {
        info!(url = %s, "https mbus URL skipped (create-env)");
    }
    for r in &cfg.rejected {
        error!(error = %r, "mbus URL rejected");
    }
    let candidates = Candidates::new(base_dir, doc, list);
    Ok(BusPlan { cfg, candidates })
}

/// `BOSH_AGENT_RESOLV_CONF` / `BOSH_AGENT_HOSTS` point resolution at other files (tests use
/// them to aim at their own DNS server); by default the system's, re-read every attempt.
pub fn resolver_source() -> ResolverSource {
    match std::env::var_os("BOSH_AGENT_RESOLV_CONF") {
        Some(rc) => ResolverSource::Files {
            resolv_conf: PathBuf::from(rc),
            hosts: std::env::var_os("BOSH_AGENT_HOSTS").map(PathBuf::from),
        },
        None => ResolverSource::System,
    }
}

/// The reconnect backoff: the default (1 s cap) unless `cap_ms`, the value of
/// `BOSH_AGENT_MBUS_BACKOFF_CAP_MS`, is a whole number of milliseconds from 10 to 10,000; the
/// first delay and the spread after a dropped connection then never exceed the cap either. Tests that restart nats-server a hundred
/// times use it; anything else there is ignored.
pub fn backoff_policy(cap_ms: Option<&str>) -> mbus::BackoffPolicy {
    let default = mbus::BackoffPolicy::default();
    match cap_ms.and_then(|v| v.trim().parse::<u64>().ok()) {
        Some(ms @ 10..=10_000) => {
            let cap = std::time::Duration::from_millis(ms);
            mbus::BackoffPolicy {
                base: default.base.min(cap),
                spread: default.spread.min(cap),
                cap,
                ..default
            }
        }
        _ => default,
    }
}

/// The return-home window ([`mbus::ReturnHome`]): the default (60–300 s) unless `value`, the
/// value of `BOSH_AGENT_MBUS_RETURN_HOME_MS`, is `off` (stay wherever the last attempt
/// landed, as upstream) or `MIN-MAX` in whole milliseconds, 100 ≤ MIN ≤ MAX ≤ 3,600,000
/// (benchmarks and tests use seconds). Anything else is warned about and ignored.
pub fn return_home(value: Option<&str>) -> Option<mbus::ReturnHome> {
    let default = Some(mbus::ReturnHome::default());
    let Some(raw) = value.map(str::trim) else {
        return default;
    };
    if raw.eq_ignore_ascii_case("off") {
        return None;
    }
    let parsed = raw.split_once('-').and_then(|(lo, hi)| {
        let (lo, hi) = (
            lo.trim().parse::<u64>().ok()?,
            hi.trim().parse::<u64>().ok()?,
        );
        (100 <= lo && lo <= hi && hi <= 3_600_000).then(|| mbus::ReturnHome {
            min: std::time::Duration::from_millis(lo),
            max: std::time::Duration::from_millis(hi),
        })
    });
    if parsed.is_none() {
        tracing::warn!(
            value = raw,
            "BOSH_AGENT_MBUS_RETURN_HOME_MS is neither `off` nor \
            MIN-MAX milliseconds (100 to 3600000); using the default"
        );
    }
    parsed.or(default)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_return_home_window_is_taken_in_range_only() {
        let d = Some(mbus::ReturnHome::default());
        assert_eq!(return_home(None), d);
        assert_eq!(return_home(Some("off")), None);
        assert_eq!(return_home(Some(" OFF ")), None);
        assert_eq!(
            return_home(Some("2000-8000")),
            Some(mbus::ReturnHome {
                min: Duration::from_secs(2),
                max: Duration::from_secs(8),
            })
        );
        assert_eq!(
            return_home(Some("100-100")).map(|w| w.max),
            Some(Duration::from_millis(100))
        );
        for bad in [
            "",
            "5",
            "99-200",
            "300-200",
            "1-3600001",
            "a-b",
            "-",
            "1000-",
            "1.5-2",
        ] {
            assert_eq!(return_home(Some(bad)), d, "{bad:?}");
        }
    }

    #[test]
    fn the_backoff_cap_is_taken_in_range_only() {
        let d = mbus::BackoffPolicy::default();
        assert_eq!(backoff_policy(None), d);
        let p = backoff_policy(Some("100"));
        assert_eq!(p.cap, Duration::from_millis(100));
        assert_eq!(p.base, Duration::from_millis(100));
        assert_eq!(p.stable_after, d.stable_after);
        assert_eq!(backoff_policy(Some("5000")).base, d.base);
        for bad in ["", "9", "10001", "-5", "1.5", "x"] {
            assert_eq!(backoff_policy(Some(bad)), d, "{bad:?}");
        }
    }
}
