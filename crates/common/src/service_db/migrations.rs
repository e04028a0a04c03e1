//! A service database's schema history: numbered SQL migrations per engine, embedded in the
//! binary and applied at start with sqlx's migrator, one migration table per service.
//!
//! The migrations are built at run time from `include_str!` files rather than with
//! `sqlx::migrate!`, since the workspace does not build sqlx's macros.

use std::borrow::Cow;

use sqlx::AnyConnection;
use sqlx::migrate::{Migrate, MigrateError, Migration, MigrationSource, MigrationType, Migrator};
use sqlx::{AnyPool, Executor};

use super::DbError;
use super::url::Engine;

/// One migration of one engine (`migrations/<engine>/NNNN_<description>.sql`).
#[derive(Debug, Clone, Copy)]
pub struct Step {
    pub version: i64,
    pub description: &'static str,
    pub sql: &'static str,
}

impl Step {
    pub const fn new(version: i64, description: &'static str, sql: &'static str) -> Self {
        Self {
            version,
            description,
            sql,
        }
    }
}

/// A column SQLite files from before migrations may lack, and the statement that adds it.
#[derive(Debug, Clone, Copy)]
pub struct LegacyColumn {
    pub table: &'static str,
    pub column: &'static str,
    pub add: &'static str,
}

/// A service's schema: the same versions for both engines, in order.
#[derive(Debug)]
pub struct Schema {
    /// The service the database belongs to: named in messages, and its PostgreSQL schema
    /// (so services sharing one database each keep their own tables and history).
    pub service: &'static str,
    pub sqlite: &'static [Step],
    pub postgres: &'static [Step],
    /// Brought in before the first migration on a SQLite file made before migrations
    /// existed, so that its tables then match migration 1 (which creates only what is
    /// missing).
    pub sqlite_legacy_columns: &'static [LegacyColumn],
}

impl Schema {
    pub fn steps(&self, engine: Engine) -> &'static [Step] {
        match engine {
            Engine::Sqlite => self.sqlite,
            Engine::Postgres => self.postgres,
        }
    }

    /// The newest migration this binary knows.
    pub fn latest(&self, engine: Engine) -> i64 {
        self.steps(engine).last().map_or(0, |s| s.version)
    }
}

type Resolved = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = Result<Vec<Migration>, sqlx::error::BoxDynError>>
            + Send
            + 'static,
    >,
>;

/// The steps as sqlx's migration source.
#[derive(Debug)]
struct Steps(&'static [Step]);

impl MigrationSource<'static> for Steps {
    fn resolve(self) -> Resolved {
        let migrations = self
            .0
            .iter()
            .map(|s| {
                Migration::new(
                    s.version,
                    Cow::Borrowed(s.description),
                    MigrationType::Simple,
                    Cow::Borrowed(s.sql),
                    false,
                )
            })
            .collect();
        Box::pin(async move { Ok(migrations) })
    }
}

/// Brings the database to the binary's newest migration; refuses one that has migrations
/// the binary does not know (it was written by a newer ferroclaw).
pub(super) async fn migrate(
    pool: &AnyPool,
    engine: Engine,
    schema: &Schema,
    at: &str,
) -> Result<(), DbError> {
    let mut conn = pool.acquire().await.map_err(|source| DbError::Open {
        service: schema.service,
        at: at.to_string(),
        source,
    })?;
    let done = run(&mut conn, engine, schema, at).await;
    if done.is_err() {
        // It may still hold PostgreSQL's migration lock: close it rather than pool it.
        let _ = conn.close().await;
    }
    done
}

async fn run(
    conn: &mut AnyConnection,
    engine: Engine,
    schema: &Schema,
    at: &str,
) -> Result<(), DbError> {
    let failed = |source: MigrateError| DbError::Migrate {
        service: schema.service,
        at: at.to_string(),
        source,
    };
    // Several instances may start at once on one PostgreSQL: one migrates at a time
    // (an advisory lock; a no-op on SQLite, which one process owns).
    conn.lock().await.map_err(failed)?;
    match engine {
        Engine::Postgres => {
            let create = format!("CREATE SCHEMA IF NOT EXISTS \"{}\"", schema.service);
            conn.execute(create.as_str())
                .await
                .map_err(|e| failed(e.into()))?;
        }
        Engine::Sqlite => {
            if !sqlite_has_table(conn, "_sqlx_migrations")
                .await
                .map_err(|e| failed(e.into()))?
            {
                add_legacy_columns(conn, schema.sqlite_legacy_columns)
                    .await
                    .map_err(|e| failed(e.into()))?;
            }
        }
    }
    conn.ensure_migrations_table().await.map_err(failed)?;
    let steps = schema.steps(engine);
    let unknown: Vec<i64> = conn
        .list_applied_migrations()
        .await
        .map_err(failed)?
        .into_iter()
        .map(|m| m.version)
        .filter(|v| !steps.iter().any(|s| s.version == *v))
        .collect();
    if !unknown.is_empty() {
        return Err(DbError::TooNew {
            service: schema.service,
            at: at.to_string(),
            unknown,
            latest: schema.latest(engine),
        });
    }
    let mut migrator = Migrator::new(Steps(steps)).await.map_err(failed)?;
    // Already locked above.
    migrator.set_locking(false);
    migrator.run(&mut *conn).await.map_err(failed)?;
    conn.unlock().await.map_err(failed)?;
    Ok(())
}

async fn sqlite_has_table(conn: &mut AnyConnection, name: &str) -> Result<bool, sqlx::Error> {
    let found: i64 =
        sqlx::query_scalar("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = $1")
            .bind(name)
            .fetch_one(&mut *conn)
            .await?;
    Ok(found > 0)
}

/// Adds the columns an older file's existing tables lack (tables it lacks are left to the
/// migrations).
async fn add_legacy_columns(
    conn: &mut AnyConnection,
    columns: &[LegacyColumn],
) -> Result<(), sqlx::Error> {
    for legacy in columns {
        let present: Vec<String> = sqlx::query_scalar("SELECT name FROM pragma_table_info($1)")
            .bind(legacy.table)
            .fetch_all(&mut *conn)
            .await?;
        if !present.is_empty() && !present.iter().any(|c| c == legacy.column) {
            conn.execute(legacy.add).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::{Location, open};
    use super::*;

    const V1_SQLITE: &str = "CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY,
        body TEXT NOT NULL, stars INTEGER NOT NULL DEFAULT 0);";
    const V1_POSTGRES: &str = "CREATE TABLE notes (id BIGINT PRIMARY KEY, body TEXT NOT NULL,
        stars BIGINT NOT NULL DEFAULT 0);";
    const V2: &str = "CREATE INDEX notes_by_stars ON notes (stars);";

    static TWO: Schema = Schema {
        service: "notes",
        sqlite: &[Step::new(1, "init", V1_SQLITE), Step::new(2, "stars", V2)],
        postgres: &[Step::new(1, "init", V1_POSTGRES), Step::new(2, "stars", V2)],
        sqlite_legacy_columns: &[LegacyColumn {
            table: "notes",
            column: "stars",
            add: "ALTER TABLE notes ADD COLUMN stars INTEGER NOT NULL DEFAULT 0",
        }],
    };
    static ONE: Schema = Schema {
        service: "notes",
        sqlite: &[Step::new(1, "init", V1_SQLITE)],
        postgres: &[Step::new(1, "init", V1_POSTGRES)],
        sqlite_legacy_columns: &[],
    };

    async fn versions(db: &super::super::Db) -> Vec<i64> {
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations ORDER BY version")
            .fetch_all(&db.pool)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_fresh_database_gets_every_migration_once() {
        let dir = tempfile::tempdir().unwrap();
        for at in crate::test_postgres::locations(dir.path(), "fresh").await {
            let db = open(&at, 2, &TWO).await.unwrap();
            assert_eq!(versions(&db).await, [1, 2], "{at:?}");
            sqlx::query("INSERT INTO notes (id, body) VALUES (1, 'kept')")
                .execute(&db.pool)
                .await
                .unwrap();
            db.pool.close().await;
            // Opening again applies nothing and keeps the rows.
            let again = open(&at, 2, &TWO).await.unwrap();
            assert_eq!(versions(&again).await, [1, 2], "{at:?}");
            let body: String = sqlx::query_scalar("SELECT body FROM notes")
                .fetch_one(&again.pool)
                .await
                .unwrap();
            assert_eq!(body, "kept");
        }
    }

    #[tokio::test]
    async fn a_database_newer_than_the_binary_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for at in crate::test_postgres::locations(dir.path(), "newer").await {
            open(&at, 2, &TWO).await.unwrap().pool.close().await;
            let err = open(&at, 2, &ONE).await.unwrap_err();
            assert!(matches!(err, DbError::TooNew { .. }), "{at:?}: {err}");
            let message = err.to_string();
            assert!(
                message.contains("the notes database")
                    && message.contains("migration(s) [2]")
                    && message.contains("knows migrations up to 1")
                    && message.contains("newer ferroclaw"),
                "{message}"
            );
        }
    }

    #[tokio::test]
    async fn a_sqlite_file_from_before_migrations_gets_its_columns_then_the_migrations() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            use sqlx::ConnectOptions;
            let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
                .filename(&path)
                .create_if_missing(true)
                .connect()
                .await
                .unwrap();
            sqlx::query("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
                .execute(&mut conn)
                .await
                .unwrap();
            sqlx::query("INSERT INTO notes VALUES (7, 'old')")
                .execute(&mut conn)
                .await
                .unwrap();
        }
        let db = open(&Location::Sqlite(path), 1, &TWO).await.unwrap();
        assert_eq!(versions(&db).await, [1, 2]);
        let row: (i64, String, i64) = sqlx::query_as("SELECT id, body, stars FROM notes")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(row, (7, "old".to_string(), 0));
    }

    #[tokio::test]
    async fn services_sharing_one_postgres_database_keep_apart() {
        let Some(cluster) = crate::test_postgres::cluster() else {
            return;
        };
        static OTHER: Schema = Schema {
            service: "other_notes",
            sqlite: &[],
            postgres: &[Step::new(1, "other", V1_POSTGRES)],
            sqlite_legacy_columns: &[],
        };
        let at = Location::Postgres(cluster.create_database("shared").await.unwrap());
        let notes = open(&at, 1, &TWO).await.unwrap();
        let other = open(&at, 1, &OTHER).await.unwrap();
        assert_eq!(versions(&notes).await, [1, 2]);
        assert_eq!(versions(&other).await, [1]);
    }
}
