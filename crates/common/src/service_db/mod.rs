//! A service's own database (runner registry, delivery ledger, scheduler tasks): a SQLite
//! file in the data directory by default, or PostgreSQL when `database_url` names one.
//!
//! Both go through sqlx's `any` driver, so each store has one set of queries; the few
//! statements the engines spell differently branch on [`Db::engine`].

mod migrations;
pub mod url;

use std::path::{Path, PathBuf};

use sqlx::any::AnyPoolOptions;
use sqlx::migrate::MigrateError;
use sqlx::{AnyPool, Executor};

pub use migrations::{LegacyColumn, Schema, Step};
pub use url::Engine;

/// Why a service database could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database_url: {0}")]
    Url(String),
    #[error("cannot open the {service} database at {at}: {source}")]
    Open {
        service: &'static str,
        at: String,
        source: sqlx::Error,
    },
    #[error("cannot migrate the {service} database at {at}: {source}")]
    Migrate {
        service: &'static str,
        at: String,
        source: MigrateError,
    },
    #[error(
        "the {service} database at {at} has migration(s) {unknown:?}, which this binary does \
         not know (it knows migrations up to {latest}): a newer ferroclaw wrote it; run that \
         version or a newer one"
    )]
    TooNew {
        service: &'static str,
        at: String,
        unknown: Vec<i64>,
        latest: i64,
    },
}

/// Where a service's database lives.
#[derive(Clone, PartialEq, Eq)]
pub enum Location {
    /// A SQLite file (the default: one in the data directory per service).
    Sqlite(PathBuf),
    /// A PostgreSQL URL; it may carry a password, which Display and Debug mask.
    Postgres(String),
}

impl Location {
    /// `url` when set (`sqlite:…` or `postgres://…`), else the SQLite file `default_file`.
    pub fn new(default_file: PathBuf, url: Option<&str>) -> Result<Self, DbError> {
        let Some(url) = url else {
            return Ok(Self::Sqlite(default_file));
        };
        match url::engine_of(url).map_err(DbError::Url)? {
            Engine::Postgres => Ok(Self::Postgres(url.to_string())),
            Engine::Sqlite => {
                use std::str::FromStr;
                let options = sqlx::sqlite::SqliteConnectOptions::from_str(url)
                    .map_err(|e| DbError::Url(format!("{:?}: {e}", url::masked(url))))?;
                Ok(Self::Sqlite(options.get_filename().to_path_buf()))
            }
        }
    }

    pub fn engine(&self) -> Engine {
        match self {
            Self::Sqlite(_) => Engine::Sqlite,
            Self::Postgres(_) => Engine::Postgres,
        }
    }

    /// The URL sqlx's `any` driver opens. A SQLite path is made absolute (a relative one
    /// would parse as a host name) and percent-encoded; `mode=rwc` creates it.
    fn connect_url(&self) -> Result<String, DbError> {
        match self {
            Self::Postgres(url) => Ok(url.clone()),
            Self::Sqlite(path) => {
                let path = std::path::absolute(path)
                    .map_err(|e| DbError::Url(format!("{}: {e}", path.display())))?;
                let path = path.to_str().ok_or_else(|| {
                    DbError::Url(format!("{} is not valid UTF-8", path.display()))
                })?;
                Ok(format!("sqlite://{}?mode=rwc", percent_encode_path(path)))
            }
        }
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sqlite(path) => write!(f, "{}", path.display()),
            Self::Postgres(url) => f.write_str(&url::masked(url)),
        }
    }
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}({self})", self.engine())
    }
}

impl From<&Path> for Location {
    fn from(path: &Path) -> Self {
        Self::Sqlite(path.to_path_buf())
    }
}

impl From<&PathBuf> for Location {
    fn from(path: &PathBuf) -> Self {
        Self::Sqlite(path.clone())
    }
}

impl From<PathBuf> for Location {
    fn from(path: PathBuf) -> Self {
        Self::Sqlite(path)
    }
}

impl From<&Location> for Location {
    fn from(at: &Location) -> Self {
        at.clone()
    }
}

/// Every byte but unreserved ones and `/` as `%XX` (sqlx decodes the path of a SQLite URL).
fn percent_encode_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || b"/-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An open service database.
#[derive(Clone, Debug)]
pub struct Db {
    pub pool: AnyPool,
    pub engine: Engine,
}

/// How long a service waits at start for a PostgreSQL server that does not answer yet.
const WAIT_FOR_SERVER: std::time::Duration = std::time::Duration::from_secs(60);

/// Whether a failed connection may work in a moment: the server is not listening or not
/// reachable yet, its name does not resolve yet (a container starting beside us), or it
/// is starting up. Not: a refused password, a missing database, a certificate that does
/// not verify.
fn not_up_yet(e: &sqlx::Error) -> bool {
    use std::io::ErrorKind::*;
    match e {
        sqlx::Error::Io(io) => {
            matches!(
                io.kind(),
                ConnectionRefused
                    | ConnectionReset
                    | ConnectionAborted
                    | TimedOut
                    | NotConnected
                    | AddrNotAvailable
                    | HostUnreachable
                    | NetworkUnreachable
                    | NetworkDown
            ) || io.to_string().contains("failed to lookup address")
        }
        sqlx::Error::PoolTimedOut => true,
        // cannot_connect_now: the server is starting up or shutting down.
        sqlx::Error::Database(db) => db.code().as_deref() == Some("57P03"),
        _ => false,
    }
}

/// Opens (creating) the database at `at` and brings its schema to the newest migration.
///
/// SQLite runs with WAL and NORMAL sync (one process owns the file, on a local disk) and
/// waits up to 30 s for a lock. On PostgreSQL every connection works in the schema named
/// after the service.
pub async fn open(
    at: &Location,
    max_connections: u32,
    schema: &'static Schema,
) -> Result<Db, DbError> {
    sqlx::any::install_default_drivers();
    let engine = at.engine();
    let shown = at.to_string();
    let opened = |source| DbError::Open {
        service: schema.service,
        at: shown.clone(),
        source,
    };
    let options = AnyPoolOptions::new()
        .max_connections(max_connections)
        .after_connect(move |conn, _| {
            Box::pin(async move {
                match engine {
                    Engine::Sqlite => {
                        conn.execute(
                            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;
                             PRAGMA busy_timeout = 30000;",
                        )
                        .await?;
                    }
                    Engine::Postgres => {
                        let path = format!("SET search_path TO \"{}\"", schema.service);
                        conn.execute(path.as_str()).await?;
                    }
                }
                Ok(())
            })
        });
    let url = at.connect_url()?;
    // A PostgreSQL that is not up yet (started beside us, restarting) is waited for a
    // while; a wrong password, database or certificate fails at once.
    let started = std::time::Instant::now();
    let mut delay = std::time::Duration::from_millis(250);
    let pool = loop {
        match options.clone().connect(&url).await {
            Ok(pool) => break pool,
            Err(e)
                if engine == Engine::Postgres
                    && not_up_yet(&e)
                    && started.elapsed() + delay < WAIT_FOR_SERVER =>
            {
                tracing::warn!(service = schema.service, database = %shown, error = %e, retry_in = ?delay,
                    "PostgreSQL is not reachable yet; waiting for it");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(5));
            }
            Err(e) => return Err(opened(e)),
        }
    };
    migrations::migrate(&pool, engine, schema, &shown).await?;
    tracing::info!(service = schema.service, database = %shown, %engine, "database open");
    Ok(Db { pool, engine })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_location_is_a_file_or_a_postgres_url() {
        let default = PathBuf::from("/data/runner.db");
        assert_eq!(
            Location::new(default.clone(), None).unwrap(),
            Location::Sqlite(default.clone())
        );
        assert_eq!(
            Location::new(default.clone(), Some("sqlite:///var/lib/r.db")).unwrap(),
            Location::Sqlite("/var/lib/r.db".into())
        );
        assert_eq!(
            Location::new(default.clone(), Some("sqlite:r.db")).unwrap(),
            Location::Sqlite("r.db".into())
        );
        let pg = Location::new(default.clone(), Some("postgres://u:pw@h/db")).unwrap();
        assert_eq!(pg.engine(), Engine::Postgres);
        assert_eq!(pg.to_string(), "postgres://u:***@h/db");
        assert_eq!(format!("{pg:?}"), "Postgres(postgres://u:***@h/db)");
        let err = Location::new(default, Some("mysql://u:pw@h/db")).unwrap_err();
        assert!(!err.to_string().contains("pw@"), "{err}");
    }

    #[test]
    fn sqlite_paths_survive_the_url() {
        let at = Location::Sqlite("/tmp/a dir/x?y#z%.db".into());
        let url = at.connect_url().unwrap();
        assert_eq!(url, "sqlite:///tmp/a%20dir/x%3Fy%23z%25.db?mode=rwc");
        use std::str::FromStr;
        let options = sqlx::sqlite::SqliteConnectOptions::from_str(&url).unwrap();
        assert_eq!(options.get_filename(), Path::new("/tmp/a dir/x?y#z%.db"));
    }
}
