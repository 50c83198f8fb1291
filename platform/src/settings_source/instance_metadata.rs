//! `InstanceMetadata` (GCP, Alibaba): one metadata value, `URI + SettingsPath`, holding the
//! settings JSON; `Headers` go with the GET (`Metadata-Flavor: Google` on GCP). No token, no
//! base64, no `agent_id` check: upstream reads it as a plain settings document.

use serde_json::Value;

use super::Context;
use super::error::FetchError;
use super::http_client::{MetadataClient, check_endpoint, status_verdict};
use super::options::InstanceMetadataOptions;
use super::user_data::settings_document;

/// The settings of one `InstanceMetadata` source.
pub fn settings(options: &InstanceMetadataOptions, ctx: &Context) -> Result<Value, FetchError> {
    check_endpoint(&options.uri, &options.headers)?;
    if options.settings_path.is_empty() {
        return Err(FetchError::Config("SettingsPath is empty".into()));
    }
    let client = MetadataClient::new(ctx.http_connect_timeout, ctx.http_timeout);
    let url = format!("{}{}", options.uri, options.settings_path);
    let headers: Vec<(&str, &str)> = options
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let body = ctx.http_retry.run(&url, |_| {
        let reply = client.send("GET", &url, &headers)?;
        if (200..=299).contains(&reply.status) {
            Ok(reply.body)
        } else {
            Err(status_verdict("GET", &url, reply.status))
        }
    })?;
    settings_document(&body, &url)
}
