//! The S3 client of an `s3://` storage root, configured in layers.
//!
//! What `[storage.s3]` in the config file sets wins; what it leaves unset comes
//! from the standard AWS environment variables, read exactly as object_store's
//! `AmazonS3Builder::from_env` reads them (every `AWS_*` variable that names an
//! `AmazonS3ConfigKey`: endpoint, region, credentials, web identity, container
//! credentials, `AWS_ALLOW_HTTP`, proxies, certificates, timeouts); what neither
//! sets keeps mboxd's or object_store's default. So an S3 root can be configured
//! through the environment alone, as Kubernetes Secrets, IRSA and EKS Pod
//! Identity do.
//!
//! The layering is done by leaving out the environment variables that a file
//! setting replaces, rather than by overwriting the builder after `from_env`:
//! object_store has no way to unset a value, and some settings are more than one
//! variable (a file endpoint replaces `AWS_ENDPOINT`, `AWS_ENDPOINT_URL` and
//! `AWS_ENDPOINT_URL_S3`; a file key pair replaces the environment's key pair and
//! its `AWS_SESSION_TOKEN`). Client options are never replaced wholesale.
//!
//! [`S3Settings::describe`] says, for the start-up log, where each effective
//! setting came from. It never prints a secret: no key, token or variable value
//! that could hold one (a proxy URL may carry a password), only the names of the
//! variables applied.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::prefix::PrefixStore;
use object_store::{BackoffConfig, ClientConfigKey, ObjectStore, RetryConfig};

use crate::config::S3Options;

/// Where an effective S3 setting came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `[storage.s3]` in the config file.
    File,
    /// The named `AWS_*` environment variable.
    Environment(String),
    /// Neither: mboxd's or object_store's default.
    Default,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File => f.write_str("file"),
            Self::Environment(var) => write!(f, "environment {var}"),
            Self::Default => f.write_str("default"),
        }
    }
}

/// One effective setting as the start-up log shows it: a value that is never a
/// secret, and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    pub value: String,
    pub source: Source,
}

impl fmt::Display for Setting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.value, self.source)
    }
}

/// The S3 client configuration of one storage root, resolved from the config
/// file and the environment, ready to [`build`](S3Settings::build).
pub struct S3Settings {
    builder: AmazonS3Builder,
    bucket: String,
    prefix: String,
    /// The endpoint requests go to; object_store's AWS endpoint by default.
    pub endpoint: Setting,
    pub region: Setting,
    pub allow_http: Setting,
    pub virtual_hosted_style: Setting,
    /// How requests are signed: a static key pair, web identity, container or
    /// instance credentials (the kind, never the key).
    pub credentials: Setting,
    pub request_timeout: Setting,
    /// Names of the other `AWS_*` variables applied (proxies, certificates,
    /// connect timeout, ...), sorted. Names only: their values may hold secrets.
    pub other_environment: Vec<String>,
}

/// The builder holds secrets, so only the description is shown.
impl fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("S3Settings").field(&self.describe()).finish()
    }
}

/// `AWS_*` variables as `from_env` reads them: names that are not UTF-8 or name no
/// setting are ignored. Sorted by name, so that when two variables set one thing
/// the outcome does not depend on the environment's order (`AWS_ENDPOINT_URL`
/// wins over `AWS_ENDPOINT`; `AWS_REGION` always wins over `AWS_DEFAULT_REGION`).
fn aws_variables(
    env: impl IntoIterator<Item = (OsString, OsString)>,
) -> Vec<(String, AmazonS3ConfigKey, String)> {
    let mut vars: Vec<_> = env
        .into_iter()
        .filter_map(|(name, value)| {
            let (name, value) = (name.into_string().ok()?, value.into_string().ok()?);
            if !name.starts_with("AWS_") {
                return None;
            }
            let key = name.to_ascii_lowercase().parse().ok()?;
            Some((name, key, value))
        })
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

const TIMEOUT: AmazonS3ConfigKey = AmazonS3ConfigKey::Client(ClientConfigKey::Timeout);
const ALLOW_HTTP: AmazonS3ConfigKey = AmazonS3ConfigKey::Client(ClientConfigKey::AllowHttp);

/// A duration as object_store's configuration parses it (humantime).
fn duration_text(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

impl S3Settings {
    /// Resolves the client for `s3://bucket/prefix` from `options` (the config
    /// file) over `env` (the process environment: `std::env::vars_os()`).
    pub fn resolve(
        bucket: &str,
        prefix: &str,
        options: &S3Options,
        env: impl IntoIterator<Item = (OsString, OsString)>,
    ) -> Self {
        use AmazonS3ConfigKey as K;
        let file_credentials =
            options.access_key_id.is_some() || options.secret_access_key.is_some();
        // The environment variables a file setting replaces. The bucket is always
        // the storage root's.
        let replaced = |key: &AmazonS3ConfigKey| match key {
            K::Bucket => true,
            K::Endpoint | K::S3Endpoint => options.endpoint.is_some(),
            K::Region | K::DefaultRegion => options.region.is_some(),
            K::AccessKeyId | K::SecretAccessKey | K::Token => file_credentials,
            K::VirtualHostedStyleRequest => options.virtual_hosted_style,
            k if *k == ALLOW_HTTP => options.allow_http,
            k if *k == TIMEOUT => options.request_timeout.is_some(),
            _ => false,
        };

        // The environment first, as from_env would apply it, minus what the file
        // replaces; `env_var` remembers which variable set each key.
        let mut builder = AmazonS3Builder::new();
        let mut env_var: BTreeMap<String, String> = BTreeMap::new();
        for (name, key, value) in aws_variables(env) {
            if replaced(&key) {
                continue;
            }
            // Sorted, AWS_DEFAULT_REGION comes before AWS_REGION, which replaces it.
            let slot = if key == K::DefaultRegion {
                K::Region
            } else {
                key
            };
            env_var.insert(slot.as_ref().to_owned(), name);
            builder = builder.with_config(key, value);
        }

        // Then the file.
        if let Some(endpoint) = &options.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let Some(region) = &options.region {
            builder = builder.with_region(region);
        }
        if let Some(key) = &options.access_key_id {
            builder = builder.with_access_key_id(key);
        }
        if let Some(secret) = &options.secret_access_key {
            builder = builder.with_secret_access_key(secret);
        }
        if options.allow_http {
            builder = builder.with_allow_http(true);
        }
        if options.virtual_hosted_style {
            builder = builder.with_virtual_hosted_style_request(true);
        }
        // object_store's own default (30 s) is short for a 16 MiB part on a slow link.
        let timeout = match options.request_timeout {
            None if env_var.contains_key(TIMEOUT.as_ref()) => None,
            t => Some(t.unwrap_or(S3Options::DEFAULT_REQUEST_TIMEOUT)),
        };
        if let Some(timeout) = timeout {
            builder = builder.with_config(TIMEOUT, duration_text(timeout));
        }
        builder = builder.with_bucket_name(bucket).with_retry(RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(5),
                base: 2.0,
            },
            max_retries: options.max_retries,
            retry_timeout: options.retry_timeout,
        });

        // What object_store will use, and where each came from.
        let source = |key: &AmazonS3ConfigKey, in_file: bool| match env_var.get(key.as_ref()) {
            _ if in_file => Source::File,
            Some(var) => Source::Environment(var.clone()),
            None => Source::Default,
        };
        let get = |key: &AmazonS3ConfigKey| builder.get_config_value(key);
        let region = get(&K::Region).unwrap_or_else(|| "us-east-1".to_owned());
        let endpoint = match get(&K::S3Endpoint) {
            // Takes precedence in object_store; only from AWS_ENDPOINT_URL_S3, as a
            // file endpoint replaces it.
            Some(url) => Setting {
                value: url,
                source: source(&K::S3Endpoint, false),
            },
            None => Setting {
                value: get(&K::Endpoint)
                    .unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com")),
                source: source(&K::Endpoint, options.endpoint.is_some()),
            },
        };
        let region = Setting {
            value: region,
            source: source(&K::Region, options.region.is_some()),
        };
        let flag = |key: &AmazonS3ConfigKey, in_file: bool| Setting {
            value: get(key).unwrap_or_else(|| "false".to_owned()),
            source: source(key, in_file),
        };
        let allow_http = flag(&ALLOW_HTTP, options.allow_http);
        let virtual_hosted_style =
            flag(&K::VirtualHostedStyleRequest, options.virtual_hosted_style);
        let credentials = credentials(&get, &env_var, file_credentials);
        let request_timeout = Setting {
            value: get(&TIMEOUT).unwrap_or_else(|| "none".to_owned()),
            source: source(&TIMEOUT, options.request_timeout.is_some()),
        };
        let shown = [
            &endpoint,
            &region,
            &allow_http,
            &virtual_hosted_style,
            &credentials,
            &request_timeout,
        ]
        .map(|s| s.source.clone());
        let mut other_environment: Vec<String> = env_var
            .values()
            .filter(|var| !shown.contains(&Source::Environment((*var).clone())))
            .cloned()
            .collect();
        other_environment.sort();
        other_environment.dedup();
        Self {
            builder,
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
            endpoint,
            region,
            allow_http,
            virtual_hosted_style,
            credentials,
            request_timeout,
            other_environment,
        }
    }

    /// The start-up log line: the root, then each setting with where it came
    /// from. Never holds a secret.
    pub fn describe(&self) -> String {
        let mut line = format!(
            "S3 storage root s3://{}/{}: endpoint={}, region={}, allow_http={}, \
             virtual_hosted_style={}, credentials={}, request_timeout={}",
            self.bucket,
            self.prefix,
            self.endpoint,
            self.region,
            self.allow_http,
            self.virtual_hosted_style,
            self.credentials,
            self.request_timeout,
        );
        if !self.other_environment.is_empty() {
            line.push_str("; also from the environment: ");
            line.push_str(&self.other_environment.join(", "));
        }
        line
    }

    /// Builds the client, rooted at the prefix.
    pub fn build(self) -> Result<Arc<dyn ObjectStore>, object_store::Error> {
        let s3 = self.builder.build()?;
        Ok(if self.prefix.is_empty() {
            Arc::new(s3)
        } else {
            Arc::new(PrefixStore::new(s3, self.prefix))
        })
    }
}

/// Which credentials object_store will use, in the order its `build` picks them:
/// a static key pair, web identity (IRSA), ECS container credentials, EKS Pod
/// Identity, else instance metadata. Unsigned requests (`AWS_SKIP_SIGNATURE`)
/// use none.
fn credentials(
    get: &impl Fn(&AmazonS3ConfigKey) -> Option<String>,
    env_var: &BTreeMap<String, String>,
    in_file: bool,
) -> Setting {
    use AmazonS3ConfigKey as K;
    let env = |key: &AmazonS3ConfigKey| {
        env_var
            .get(key.as_ref())
            .map_or(Source::Default, |var| Source::Environment(var.clone()))
    };
    let set = |value: &str, source: Source| Setting {
        value: value.to_owned(),
        source,
    };
    let is_true = |key: &AmazonS3ConfigKey| {
        get(key).is_some_and(|v| {
            matches!(
                v.to_ascii_lowercase().as_str(),
                "1" | "true" | "on" | "yes" | "y"
            )
        })
    };
    if is_true(&K::SkipSignature) {
        return set("none, unsigned requests", env(&K::SkipSignature));
    }
    if in_file {
        return set("access key", Source::File);
    }
    if get(&K::AccessKeyId).is_some() || get(&K::SecretAccessKey).is_some() {
        let value = if get(&K::Token).is_some() {
            "access key with session token"
        } else {
            "access key"
        };
        let source = match env(&K::AccessKeyId) {
            Source::Default => env(&K::SecretAccessKey),
            source => source,
        };
        return set(value, source);
    }
    if get(&K::WebIdentityTokenFile).is_some()
        && let Some(role) = get(&K::RoleArn)
    {
        return set(
            &format!("web identity, role {role}"),
            env(&K::WebIdentityTokenFile),
        );
    }
    if get(&K::ContainerCredentialsRelativeUri).is_some() {
        return set(
            "container credentials (ECS task role)",
            env(&K::ContainerCredentialsRelativeUri),
        );
    }
    if get(&K::ContainerCredentialsFullUri).is_some()
        && get(&K::ContainerAuthorizationTokenFile).is_some()
    {
        return set("EKS Pod Identity", env(&K::ContainerCredentialsFullUri));
    }
    set("instance metadata (IMDS)", Source::Default)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Storage;

    /// An environment from `NAME=value` pairs.
    fn env(vars: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        vars.iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect()
    }

    /// The file's `[storage.s3]` with nothing set: mboxd's defaults.
    fn unset() -> S3Options {
        Storage::default().s3
    }

    fn value(settings: &S3Settings, key: AmazonS3ConfigKey) -> Option<String> {
        settings.builder.get_config_value(&key)
    }

    fn from_env(var: &str) -> Source {
        Source::Environment(var.to_owned())
    }

    const SECRET: &str = "env-secret-value-0123";
    const TOKEN: &str = "env-session-token-4567";

    #[test]
    fn the_environment_alone_configures_every_setting() {
        let env = env(&[
            ("AWS_ACCESS_KEY_ID", "AKIAENV"),
            ("AWS_SECRET_ACCESS_KEY", SECRET),
            ("AWS_REGION", "eu-west-3"),
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:9000"),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_PROXY_URL", "http://user:proxy-password@proxy:3128"),
            ("AWS_PROXY_CA_CERTIFICATE", "/etc/ssl/proxy.pem"),
            ("AWS_CONNECT_TIMEOUT", "2s"),
            ("AWS_TIMEOUT", "45s"),
            ("AWS_BUCKET", "not-the-root"),
            ("HOME", "/root"),
        ]);
        let s = S3Settings::resolve("runs", "team/a", &unset(), env);
        use AmazonS3ConfigKey as K;
        let client = |k| value(&s, K::Client(k));
        // The client options the environment set survive (object_store's own
        // parsing of AWS_ALLOW_HTTP etc. happens at build, from these values).
        assert_eq!(client(ClientConfigKey::AllowHttp).as_deref(), Some("true"));
        assert_eq!(
            client(ClientConfigKey::ProxyUrl).as_deref(),
            Some("http://user:proxy-password@proxy:3128")
        );
        assert_eq!(
            client(ClientConfigKey::ProxyCaCertificate).as_deref(),
            Some("/etc/ssl/proxy.pem")
        );
        assert_eq!(
            client(ClientConfigKey::ConnectTimeout).as_deref(),
            Some("2s")
        );
        assert_eq!(client(ClientConfigKey::Timeout).as_deref(), Some("45s"));
        assert_eq!(
            value(&s, K::Endpoint).as_deref(),
            Some("http://127.0.0.1:9000")
        );
        assert_eq!(value(&s, K::Region).as_deref(), Some("eu-west-3"));
        assert_eq!(value(&s, K::AccessKeyId).as_deref(), Some("AKIAENV"));
        assert_eq!(value(&s, K::SecretAccessKey).as_deref(), Some(SECRET));
        assert_eq!(value(&s, K::Bucket).as_deref(), Some("runs"));

        assert_eq!(
            s.endpoint,
            Setting {
                value: "http://127.0.0.1:9000".into(),
                source: from_env("AWS_ENDPOINT_URL")
            }
        );
        assert_eq!(s.region.source, from_env("AWS_REGION"));
        assert_eq!(s.allow_http.value, "true");
        assert_eq!(s.allow_http.source, from_env("AWS_ALLOW_HTTP"));
        assert_eq!(s.virtual_hosted_style.value, "false");
        assert_eq!(s.virtual_hosted_style.source, Source::Default);
        assert_eq!(s.credentials.value, "access key");
        assert_eq!(s.credentials.source, from_env("AWS_ACCESS_KEY_ID"));
        assert_eq!(s.request_timeout.value, "45s");
        assert_eq!(s.request_timeout.source, from_env("AWS_TIMEOUT"));
        assert_eq!(
            s.other_environment,
            [
                "AWS_CONNECT_TIMEOUT",
                "AWS_PROXY_CA_CERTIFICATE",
                "AWS_PROXY_URL",
                "AWS_SECRET_ACCESS_KEY"
            ]
        );
        assert_eq!(
            s.describe(),
            "S3 storage root s3://runs/team/a: \
             endpoint=http://127.0.0.1:9000 (environment AWS_ENDPOINT_URL), \
             region=eu-west-3 (environment AWS_REGION), \
             allow_http=true (environment AWS_ALLOW_HTTP), \
             virtual_hosted_style=false (default), \
             credentials=access key (environment AWS_ACCESS_KEY_ID), \
             request_timeout=45s (environment AWS_TIMEOUT); \
             also from the environment: AWS_CONNECT_TIMEOUT, AWS_PROXY_CA_CERTIFICATE, \
             AWS_PROXY_URL, AWS_SECRET_ACCESS_KEY"
        );
    }

    #[test]
    fn file_values_override_the_same_environment_variables() {
        let options = S3Options {
            endpoint: Some("http://127.0.0.1:7000".into()),
            region: Some("us-west-2".into()),
            access_key_id: Some("AKIAFILE".into()),
            secret_access_key: Some("file-secret-value-89".into()),
            allow_http: true,
            virtual_hosted_style: true,
            request_timeout: Some(Duration::from_millis(12_500)),
            ..unset()
        };
        let env = env(&[
            ("AWS_ACCESS_KEY_ID", "AKIAENV"),
            ("AWS_SECRET_ACCESS_KEY", SECRET),
            ("AWS_SESSION_TOKEN", TOKEN),
            ("AWS_REGION", "eu-west-3"),
            ("AWS_DEFAULT_REGION", "eu-west-1"),
            ("AWS_ENDPOINT", "http://127.0.0.1:1"),
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:2"),
            ("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:3"),
            ("AWS_ALLOW_HTTP", "false"),
            ("AWS_VIRTUAL_HOSTED_STYLE_REQUEST", "false"),
            ("AWS_TIMEOUT", "45s"),
            ("AWS_PROXY_URL", "http://proxy:3128"),
        ]);
        let s = S3Settings::resolve("runs", "", &options, env);
        use AmazonS3ConfigKey as K;
        assert_eq!(
            value(&s, K::Endpoint).as_deref(),
            Some("http://127.0.0.1:7000")
        );
        // AWS_ENDPOINT_URL_S3 would take precedence in object_store: it is dropped.
        assert_eq!(value(&s, K::S3Endpoint), None);
        assert_eq!(value(&s, K::Region).as_deref(), Some("us-west-2"));
        assert_eq!(value(&s, K::AccessKeyId).as_deref(), Some("AKIAFILE"));
        assert_eq!(
            value(&s, K::SecretAccessKey).as_deref(),
            Some("file-secret-value-89")
        );
        // The environment's token belongs to the environment's key pair.
        assert_eq!(value(&s, K::Token), None);
        assert_eq!(value(&s, ALLOW_HTTP).as_deref(), Some("true"));
        assert_eq!(
            value(&s, K::VirtualHostedStyleRequest).as_deref(),
            Some("true")
        );
        // Parsed by object_store exactly as it parses AWS_TIMEOUT.
        assert_eq!(value(&s, TIMEOUT).as_deref(), Some("12500ms"));
        // What the file does not set still comes from the environment.
        assert_eq!(
            value(&s, K::Client(ClientConfigKey::ProxyUrl)).as_deref(),
            Some("http://proxy:3128")
        );
        for setting in [
            &s.endpoint,
            &s.region,
            &s.allow_http,
            &s.virtual_hosted_style,
            &s.credentials,
            &s.request_timeout,
        ] {
            assert_eq!(setting.source, Source::File, "{setting}");
        }
        assert_eq!(s.other_environment, ["AWS_PROXY_URL"]);
        assert_eq!(
            s.describe(),
            "S3 storage root s3://runs/: endpoint=http://127.0.0.1:7000 (file), \
             region=us-west-2 (file), allow_http=true (file), virtual_hosted_style=true (file), \
             credentials=access key (file), request_timeout=12500ms (file); \
             also from the environment: AWS_PROXY_URL"
        );
        assert!(s.build().is_ok());
    }

    #[test]
    fn false_in_the_file_leaves_the_environment_in_charge() {
        // The shipped file shows `allow_http = false` as the default; a copy of it
        // must not undo AWS_ALLOW_HTTP.
        let env = env(&[
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_VIRTUAL_HOSTED_STYLE_REQUEST", "true"),
        ]);
        let s = S3Settings::resolve("b", "p", &unset(), env);
        assert_eq!(value(&s, ALLOW_HTTP).as_deref(), Some("true"));
        assert_eq!(
            s.allow_http.to_string(),
            "true (environment AWS_ALLOW_HTTP)"
        );
        assert_eq!(
            s.virtual_hosted_style.to_string(),
            "true (environment AWS_VIRTUAL_HOSTED_STYLE_REQUEST)"
        );
    }

    #[test]
    fn defaults_when_nothing_is_set() {
        let s = S3Settings::resolve("b", "p", &unset(), env(&[("PATH", "/bin")]));
        assert_eq!(
            s.describe(),
            "S3 storage root s3://b/p: endpoint=https://s3.us-east-1.amazonaws.com (default), \
             region=us-east-1 (default), allow_http=false (default), \
             virtual_hosted_style=false (default), credentials=instance metadata (IMDS) (default), \
             request_timeout=60s (default)"
        );
        assert!(s.build().is_ok());
    }

    #[test]
    fn region_and_endpoint_variables_resolve_in_a_fixed_order() {
        // Whatever the order of the environment, AWS_REGION beats
        // AWS_DEFAULT_REGION and AWS_ENDPOINT_URL_S3 > AWS_ENDPOINT_URL > AWS_ENDPOINT.
        let vars = [
            ("AWS_REGION", "eu-west-3"),
            ("AWS_ENDPOINT_URL", "http://url"),
            ("AWS_DEFAULT_REGION", "eu-west-1"),
            ("AWS_ENDPOINT", "http://plain"),
        ];
        let mut reversed = vars;
        reversed.reverse();
        for order in [vars, reversed] {
            let s = S3Settings::resolve("b", "p", &unset(), env(&order));
            assert_eq!(s.region.to_string(), "eu-west-3 (environment AWS_REGION)");
            assert_eq!(
                s.endpoint.to_string(),
                "http://url (environment AWS_ENDPOINT_URL)"
            );
        }
        let s = S3Settings::resolve(
            "b",
            "p",
            &unset(),
            env(&[
                ("AWS_DEFAULT_REGION", "eu-west-1"),
                ("AWS_ENDPOINT", "http://plain"),
                ("AWS_ENDPOINT_URL_S3", "http://s3-only"),
            ]),
        );
        assert_eq!(
            s.region.to_string(),
            "eu-west-1 (environment AWS_DEFAULT_REGION)"
        );
        assert_eq!(
            s.endpoint.to_string(),
            "http://s3-only (environment AWS_ENDPOINT_URL_S3)"
        );
    }

    #[test]
    fn credentials_are_named_by_kind_and_source() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[
                    ("AWS_ACCESS_KEY_ID", "AKIAENV"),
                    ("AWS_SECRET_ACCESS_KEY", SECRET),
                    ("AWS_SESSION_TOKEN", TOKEN),
                ],
                "access key with session token (environment AWS_ACCESS_KEY_ID)",
            ),
            (
                &[
                    ("AWS_WEB_IDENTITY_TOKEN_FILE", "/var/run/secrets/token"),
                    ("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/mboxd"),
                ],
                "web identity, role arn:aws:iam::123456789012:role/mboxd \
                 (environment AWS_WEB_IDENTITY_TOKEN_FILE)",
            ),
            (
                &[(
                    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                    "/v2/credentials/x",
                )],
                "container credentials (ECS task role) \
                 (environment AWS_CONTAINER_CREDENTIALS_RELATIVE_URI)",
            ),
            (
                &[
                    (
                        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                        "http://169.254.170.23/v1/credentials",
                    ),
                    (
                        "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
                        "/var/run/secrets/pods.eks.amazonaws.com/token",
                    ),
                ],
                "EKS Pod Identity (environment AWS_CONTAINER_CREDENTIALS_FULL_URI)",
            ),
            (
                &[("AWS_SKIP_SIGNATURE", "true")],
                "none, unsigned requests (environment AWS_SKIP_SIGNATURE)",
            ),
        ];
        for (vars, expected) in cases {
            let s = S3Settings::resolve("b", "p", &unset(), env(vars));
            assert_eq!(s.credentials.to_string(), *expected);
            assert!(s.build().is_ok(), "{expected}");
        }
    }

    #[test]
    fn secrets_are_never_described() {
        let file = S3Options {
            access_key_id: Some("AKIAFILE".into()),
            secret_access_key: Some("file-secret-value-89".into()),
            ..unset()
        };
        let env = env(&[
            ("AWS_ACCESS_KEY_ID", "AKIAENV"),
            ("AWS_SECRET_ACCESS_KEY", SECRET),
            ("AWS_SESSION_TOKEN", TOKEN),
            ("AWS_PROXY_URL", "http://user:proxy-password@proxy:3128"),
            ("AWS_SSE_CUSTOMER_KEY_BASE64", "c3NlLWN1c3RvbWVyLWtleQ=="),
        ]);
        for options in [unset(), file] {
            let s = S3Settings::resolve("b", "p", &options, env.clone());
            let shown = format!("{}\n{s:?}", s.describe());
            for secret in [
                "AKIAFILE",
                "AKIAENV",
                "file-secret-value-89",
                SECRET,
                TOKEN,
                "proxy-password",
                "c3NlLWN1c3RvbWVyLWtleQ==",
            ] {
                assert!(!shown.contains(secret), "{secret} shown in {shown}");
            }
            assert!(shown.contains("AWS_PROXY_URL"), "{shown}");
        }
    }
}
