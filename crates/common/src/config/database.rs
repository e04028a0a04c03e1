//! `database_url` of the runner, delivery and scheduler sections: where a service keeps its
//! own database. Unset, it is a SQLite file in the data directory.

use super::env::Get;
use super::{ConfigError, invalid};
use crate::service_db::url::{Engine, engine_of, masked};

/// The override of `service`'s database URL: `FERROCLAW_<SERVICE>_DATABASE_URL`, else
/// `DATABASE_URL` (every service). Empty counts as unset, so compose can pass both through.
pub(super) fn from_env(get: Get<'_>, service: &str) -> Option<String> {
    let own = format!("FERROCLAW_{}_DATABASE_URL", service.to_ascii_uppercase());
    get(&own)
        .filter(|v| !v.is_empty())
        .or_else(|| get("DATABASE_URL").filter(|v| !v.is_empty()))
}

/// Only `sqlite:` and `postgres://` (`postgresql://`) URLs; the message never shows a
/// password.
pub(super) fn validate(service: &str, url: Option<&str>) -> Result<(), ConfigError> {
    let Some(url) = url else {
        return Ok(());
    };
    engine_of(url).map(drop).map_err(|why| {
        invalid(
            format!("{service}.database_url"),
            format!(
                "{why} (set in the file, FERROCLAW_{}_DATABASE_URL or DATABASE_URL)",
                service.to_ascii_uppercase()
            ),
        )
    })
}

/// Services cannot share one SQLite file (each owns its file; PostgreSQL gives each its own
/// schema in a shared database).
pub(super) fn validate_distinct(urls: &[(&str, Option<&str>)]) -> Result<(), ConfigError> {
    for (i, (service, url)) in urls.iter().enumerate() {
        let Some(url) = url.filter(|u| engine_of(u) == Ok(Engine::Sqlite)) else {
            continue;
        };
        if let Some((other, _)) = urls[..i].iter().find(|(_, u)| *u == Some(url)) {
            return Err(invalid(
                format!("{service}.database_url"),
                format!(
                    "{} is also {other}'s database: each service needs a SQLite file of its \
                     own (leave database_url unset for the default files, or use \
                     PostgreSQL)",
                    masked(url)
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::Config;

    fn env(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            vars.iter()
                .find(|(var, _)| *var == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn each_service_takes_its_url_from_the_file_or_the_environment() {
        let c = Config::default();
        assert_eq!(c.runner.database_url, None);
        let c = Config::parse(
            "[runner]\ndatabase_url = \"postgres://r@db/f\"\n\
             [delivery]\ndatabase_url = \"sqlite:///d/delivery.db\"\n\
             [scheduler]\nlisten = \"127.0.0.1:1\"\ndatabase_url = \"postgresql://db/f\"\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.runner.database_url.as_deref(), Some("postgres://r@db/f"));
        assert_eq!(
            c.delivery.database_url.as_deref(),
            Some("sqlite:///d/delivery.db")
        );
        assert_eq!(
            c.scheduler.database_url.as_deref(),
            Some("postgresql://db/f")
        );

        let mut c = Config::default();
        c.apply_env(env(&[
            ("DATABASE_URL", "postgres://all@db/f"),
            ("FERROCLAW_SCHEDULER_DATABASE_URL", "postgres://sched@db/f"),
            ("FERROCLAW_RUNNER_DATABASE_URL", ""),
        ]))
        .unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.runner.database_url.as_deref(),
            Some("postgres://all@db/f")
        );
        assert_eq!(
            c.delivery.database_url.as_deref(),
            Some("postgres://all@db/f")
        );
        assert_eq!(
            c.scheduler.database_url.as_deref(),
            Some("postgres://sched@db/f")
        );
    }

    #[test]
    fn a_bad_url_is_refused_by_key_without_its_password() {
        let mut c = Config::default();
        c.apply_env(env(&[(
            "FERROCLAW_DELIVERY_DATABASE_URL",
            "mysql://u:hunter2@db/f",
        )]))
        .unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("delivery.database_url")
                && err.contains("mysql://u:***@db/f")
                && err.contains("FERROCLAW_DELIVERY_DATABASE_URL"),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn services_cannot_share_a_sqlite_file() {
        let mut c = Config::default();
        c.apply_env(env(&[("DATABASE_URL", "sqlite:///d/all.db")]))
            .unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("delivery.database_url") && err.contains("also runner's database"),
            "{err}"
        );
        let mut c = Config::default();
        c.apply_env(env(&[("DATABASE_URL", "postgres://u:pw@db/f")]))
            .unwrap();
        c.validate().unwrap();
    }
}
