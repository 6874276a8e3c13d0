//! The storage flags every daemon takes (the game server and the
//! coordinator), so they are spelled and checked the same way everywhere.

use std::path::PathBuf;
use std::time::Duration;

use crate::StoreConfig;

#[derive(Debug, Clone, clap::Args)]
pub struct StoreArgs {
    /// The store: `postgres://…` (CockroachDB or PostgreSQL) or `memory:`
    /// (lost at exit). Unset: the embedded store under `--data-dir`.
    #[arg(long, env = "PS_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Directory of the embedded store, used when no database URL is given.
    /// Every process of a local mesh may share it.
    #[arg(long, env = "PS_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,
    /// PEM file of the CA that signed the database's certificate: connect to
    /// PostgreSQL/CockroachDB over verified TLS (put `sslmode=require` in the
    /// URL). Unset: no TLS.
    #[arg(long, env = "PS_DATABASE_CA_FILE")]
    pub database_ca_file: Option<PathBuf>,
    /// Database connections this process keeps.
    #[arg(long, env = "PS_DB_POOL_SIZE", default_value_t = 16)]
    pub db_pool_size: usize,
    /// Give up on an unreachable database at start-up after this many seconds.
    #[arg(long, env = "PS_DB_CONNECT_TIMEOUT_S", default_value_t = 10)]
    pub db_connect_timeout_s: u64,
    /// Redis (`redis://…`): sessions, the player directory, rate limits,
    /// leaderboards, world events. Unset or down: those degrade (see the
    /// `cache_*` metrics), nothing fails.
    #[arg(long, env = "PS_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
}

impl StoreArgs {
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=256).contains(&self.db_pool_size) {
            return Err("database pool size must be 1..=256".into());
        }
        if !(1..=300).contains(&self.db_connect_timeout_s) {
            return Err("database connect timeout must be 1..=300 s".into());
        }
        if let Some(url) = &self.redis_url
            && redis::Client::open(url.as_str()).is_err()
        {
            return Err(format!("the Redis URL {} is not valid", crate::redact(url)));
        }
        Ok(())
    }

    /// The database URL, or the embedded store's.
    pub fn url(&self) -> String {
        match &self.database_url {
            Some(url) => url.clone(),
            None => crate::embedded_url(&self.data_dir),
        }
    }

    pub fn store_config(&self, chunk_voxels: u32) -> StoreConfig {
        StoreConfig {
            url: self.url(),
            chunk_voxels,
            pool_size: self.db_pool_size,
            connect_timeout: Duration::from_secs(self.db_connect_timeout_s),
            migrate: true,
            ca_file: self.database_ca_file.clone(),
        }
    }
}
