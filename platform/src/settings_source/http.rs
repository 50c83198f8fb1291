//! `HTTP`: the metadata service (AWS, OpenStack, Alibaba). The settings are the user data at
//! `URI + UserDataPath`. With a `TokenPath`, every try first PUTs there with
//! `X-aws-ec2-metadata-token-ttl-seconds: 300` (IMDSv2) and sends the answer as
//! `X-aws-ec2-metadata-token` on the GETs; `Headers` go with the GETs only, as upstream.
//!
//! Unlike upstream, a token request that is answered with a refusal (403, 404, 405, …) falls
//! back to no token (IMDSv1), as AWS's own SDKs do, instead of failing the source; a token
//! request without an answer (or a 5xx) is retried with the GET, as one try.

use serde_json::Value;

use super::Context;
use super::error::{FetchError, redact_url};
use super::http_client::{MetadataClient, Reply, check_endpoint, retryable_status, status_verdict};
use super::options::HttpOptions;
use super::retry::Verdict;
use super::user_data::settings_from_user_data;

/// The IMDSv2 token's lifetime asked for, in seconds (upstream's).
pub const TOKEN_TTL_SECONDS: &str = "300";
/// The header of the token request.
pub const TOKEN_TTL_HEADER: &str = "X-aws-ec2-metadata-token-ttl-seconds";
/// The header that carries the token on later requests.
pub const TOKEN_HEADER: &str = "X-aws-ec2-metadata-token";

/// The metadata service of one `HTTP` source.
pub struct HttpSource<'a> {
    options: &'a HttpOptions,
    ctx: &'a Context,
    client: MetadataClient,
}

impl<'a> HttpSource<'a> {
    /// Checks the options (URI, header names and values); no request is made.
    pub fn new(options: &'a HttpOptions, ctx: &'a Context) -> Result<Self, FetchError> {
        check_endpoint(&options.uri, &options.headers)?;
        Ok(HttpSource {
            options,
            ctx,
            client: MetadataClient::new(ctx.http_connect_timeout, ctx.http_timeout),
        })
    }

    /// The settings: the user data, JSON or base64 of JSON, with an `agent_id`.
    pub fn settings(&self) -> Result<Value, FetchError> {
        if self.options.user_data_path.is_empty() {
            return Err(FetchError::Config("UserDataPath is empty".into()));
        }
        let url = self.url(&self.options.user_data_path);
        let body = self.get_ok(&url)?;
        settings_from_user_data(&body, &url)
    }

    /// The instance id at `InstanceIDPath` (`None` without one), trimmed.
    pub fn instance_id(&self) -> Result<Option<String>, FetchError> {
        if self.options.instance_id_path.is_empty() {
            return Ok(None);
        }
        let url = self.url(&self.options.instance_id_path);
        let body = self.get_ok(&url)?;
        Ok(Some(String::from_utf8_lossy(&body).trim().to_string()))
    }

    /// vcap's public key at `SSHKeysPath`: `None` without the path, or when the service has
    /// none (404), as upstream.
    pub fn public_ssh_key(&self) -> Result<Option<String>, FetchError> {
        if self.options.ssh_keys_path.is_empty() {
            return Ok(None);
        }
        let url = self.url(&self.options.ssh_keys_path);
        self.ctx.http_retry.run(&url, |_| {
            let reply = self.get(&url)?;
            match reply.status {
                200..=299 => {
                    let key = String::from_utf8_lossy(&reply.body).trim().to_string();
                    Ok((!key.is_empty()).then_some(key))
                }
                404 => {
                    tracing::warn!(url = %redact_url(&url), "the metadata service has no public key");
                    Ok(None)
                }
                s => Err(status_verdict("GET", &url, s)),
            }
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.options.uri, path)
    }

    /// The body of a 2xx answer to a GET of `url`, with retries.
    fn get_ok(&self, url: &str) -> Result<Vec<u8>, FetchError> {
        self.ctx.http_retry.run(url, |_| {
            let reply = self.get(url)?;
            if (200..=299).contains(&reply.status) {
                Ok(reply.body)
            } else {
                Err(status_verdict("GET", url, reply.status))
            }
        })
    }

    /// One try: the token (when configured), then the GET.
    fn get(&self, url: &str) -> Result<Reply, Verdict> {
        let token = self.token()?;
        let mut headers: Vec<(&str, &str)> = self
            .options
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        if let Some(t) = &token {
            headers.push((TOKEN_HEADER, t));
        }
        self.client.send("GET", url, &headers)
    }

    /// The IMDSv2 token: `None` without a `TokenPath`, or when the service refuses to give
    /// one (then the GETs go without, IMDSv1).
    fn token(&self) -> Result<Option<String>, Verdict> {
        if self.options.token_path.is_empty() {
            return Ok(None);
        }
        let url = self.url(&self.options.token_path);
        let reply = self
            .client
            .send("PUT", &url, &[(TOKEN_TTL_HEADER, TOKEN_TTL_SECONDS)])?;
        match reply.status {
            200..=299 => {
                let token = String::from_utf8_lossy(&reply.body).trim().to_string();
                if token.is_empty() {
                    return Ok(None);
                }
                if !token.chars().all(|c| c.is_ascii_graphic()) {
                    return Err(Verdict::Final(FetchError::Config(format!(
                        "the token from {} is not a valid header value",
                        redact_url(&url)
                    ))));
                }
                Ok(Some(token))
            }
            s if retryable_status(s) => Err(status_verdict("PUT", &url, s)),
            s => {
                tracing::warn!(url = %redact_url(&url), status = s, "no IMDSv2 token; going on without one");
                Ok(None)
            }
        }
    }
}
