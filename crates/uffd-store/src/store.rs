//! Where snapshots live: a URL opened with `object_store`, and the layout
//! of a snapshot's objects in it.
//!
//! `s3://bucket/dir/NAME` names the manifest object `dir/NAME`; its chunks
//! live under `dir/.chunks/<blake3 hex>`, shared by every snapshot in
//! `dir/`, which is what makes identical chunks stored once across
//! snapshots (and lets a snapshot use its parent's chunks). Its page index
//! is `dir/.pages/NAME`: in a folder of its own, so that no snapshot name
//! can collide with it and `ls` sees manifests only.

use std::sync::Arc;
use std::time::Duration;

use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreScheme, RetryConfig};

use crate::manifest::ChunkHash;

/// The folder, next to the snapshots, that holds their chunks.
pub const CHUNK_DIR: &str = ".chunks";
/// The folder, next to the snapshots, that holds their page indexes.
pub const PAGES_DIR: &str = ".pages";

/// How to reach the store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Extra builder settings applied after the environment's, as
    /// `object_store` config keys (`aws_endpoint`, `aws_allow_http`,
    /// `aws_access_key_id`...). The command line leaves this empty: the
    /// standard environment variables are the way to configure it.
    pub config: Vec<(String, String)>,
    /// Bound on one request's retries (5xx, timeouts, connection errors;
    /// with exponential backoff and jitter, by `object_store`) and on each
    /// request.
    pub timeout: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            config: Vec::new(),
            timeout: Duration::from_secs(30),
        }
    }
}

/// Why a store could not be opened or used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Not a URL.
    #[error(
        "{url:?} is not a URL ({source}): use s3://bucket/path, gs://, az://, or file:///path"
    )]
    Url {
        /// What was given.
        url: String,
        /// Why it does not parse.
        source: url::ParseError,
    },
    /// A URL `object_store` cannot open, or bad settings.
    #[error("cannot open {url}: {source}")]
    Open {
        /// The URL.
        url: String,
        /// `object_store`'s reason.
        source: object_store::Error,
    },
    /// The URL names no object (e.g. `s3://bucket` alone).
    #[error("{0} names no snapshot: give bucket and name, e.g. s3://bucket/vm-1")]
    NoName(String),
}

/// A store and the path of one snapshot (or folder of snapshots) in it.
#[derive(Debug, Clone)]
pub struct Location {
    /// The store.
    pub store: Arc<dyn ObjectStore>,
    /// The URL as given.
    pub url: String,
    /// The path the URL names inside the store.
    pub path: Path,
}

impl Location {
    /// Opens `url`. S3, GCS and Azure builders start from their standard
    /// environment variables (`AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`,
    /// `AWS_ACCESS_KEY_ID`, `AWS_REGION`, `GOOGLE_*`, `AZURE_*`...), then
    /// take `options.config`; `file://` is a local directory.
    pub fn open(url: &str, options: &StoreOptions) -> Result<Location, StoreError> {
        let parsed = url::Url::parse(url).map_err(|source| StoreError::Url {
            url: url.to_string(),
            source,
        })?;
        let open_err = |source: object_store::Error| StoreError::Open {
            url: url.to_string(),
            source,
        };
        let (scheme, path) = ObjectStoreScheme::parse(&parsed).map_err(|e| open_err(e.into()))?;
        let retry = RetryConfig {
            retry_timeout: options.timeout,
            ..RetryConfig::default()
        };
        // Through config keys, not `with_client_options`, which would
        // replace the client settings the environment gave (AWS_ALLOW_HTTP
        // among them).
        let timeouts = [
            ("timeout", format!("{}ms", options.timeout.as_millis())),
            (
                "connect_timeout",
                format!(
                    "{}ms",
                    options.timeout.min(Duration::from_secs(5)).as_millis()
                ),
            ),
        ];
        // Each builder takes the keys it knows, as `parse_url_opts` does.
        macro_rules! build {
            ($builder:ty) => {{
                let mut b = <$builder>::from_env().with_url(url).with_retry(retry);
                for (k, v) in timeouts.iter().map(|(k, v)| (*k, v)) {
                    b = b.with_config(k.parse().map_err(open_err)?, v.clone());
                }
                for (k, v) in &options.config {
                    if let Ok(key) = k.to_ascii_lowercase().parse() {
                        b = b.with_config(key, v.clone());
                    }
                }
                Arc::new(b.build().map_err(open_err)?)
            }};
        }
        let store: Arc<dyn ObjectStore> = match scheme {
            ObjectStoreScheme::AmazonS3 => build!(object_store::aws::AmazonS3Builder),
            ObjectStoreScheme::GoogleCloudStorage => {
                build!(object_store::gcp::GoogleCloudStorageBuilder)
            }
            ObjectStoreScheme::MicrosoftAzure => build!(object_store::azure::MicrosoftAzureBuilder),
            _ => {
                let (store, _) =
                    object_store::parse_url_opts(&parsed, options.config.iter().cloned())
                        .map_err(open_err)?;
                Arc::from(store)
            }
        };
        Ok(Location {
            store,
            url: url.to_string(),
            path,
        })
    }

    /// The snapshot's name (the URL's last path segment).
    pub fn name(&self) -> Result<&str, StoreError> {
        self.path
            .filename()
            .ok_or_else(|| StoreError::NoName(self.url.clone()))
    }

    /// The folder holding the snapshot (and its chunks' folder).
    pub fn folder(&self) -> Path {
        let mut parts: Vec<_> = self.path.parts().collect();
        parts.pop();
        Path::from_iter(parts)
    }

    /// The snapshot's page index object.
    pub fn index_path(&self) -> Result<Path, StoreError> {
        let name = self.name()?.to_string();
        Ok(self.folder().join(PAGES_DIR).join(name.as_str()))
    }

    /// The folder part of the URL (`s3://bucket/dir` of
    /// `s3://bucket/dir/NAME`): two snapshots share chunks when theirs are
    /// the same.
    pub fn folder_url(&self) -> &str {
        self.url
            .trim_end_matches('/')
            .rsplit_once('/')
            .map_or(self.url.as_str(), |(folder, _)| folder)
    }

    /// The object of chunk `hash`, shared by every snapshot in the folder.
    pub fn chunk_path(&self, hash: &ChunkHash) -> Path {
        self.folder().join(CHUNK_DIR).join(hash.to_hex().as_str())
    }
}
