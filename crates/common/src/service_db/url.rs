//! A service's `database_url`: which engines it may name, and how it is shown (never with its
//! password).

/// The database engine behind a service's store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

impl std::fmt::Display for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Sqlite => "SQLite",
            Self::Postgres => "PostgreSQL",
        })
    }
}

/// The engine `url` names, or why it is refused (in a sentence that shows no password).
pub fn engine_of(url: &str) -> Result<Engine, String> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Engine::Postgres)
    } else if url.starts_with("sqlite:") {
        Ok(Engine::Sqlite)
    } else {
        Err(format!(
            "{:?} is neither a sqlite: nor a postgres:// (postgresql://) URL",
            masked(url)
        ))
    }
}

/// `url` with its password, in the user part or a `password=` parameter, shown as `***`.
pub fn masked(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let query_at = rest.find('?').unwrap_or(rest.len());
    let (before_query, query) = rest.split_at(query_at);
    // The last `@` before the query ends the user part (a password may hold `/` or `@`).
    let authority = match before_query.rfind('@') {
        Some(at) => match before_query[..at].split_once(':') {
            Some((user, _)) => format!("{user}:***{}", &before_query[at..]),
            None => before_query.to_string(),
        },
        None => before_query.to_string(),
    };
    let query = match query.strip_prefix('?') {
        Some(params) => {
            let params: Vec<String> = params
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some((key, _)) if key.eq_ignore_ascii_case("password") => {
                        format!("{key}=***")
                    }
                    _ => p.to_string(),
                })
                .collect();
            format!("?{}", params.join("&"))
        }
        None => String::new(),
    };
    format!("{scheme}://{authority}{query}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engines_are_named_by_scheme() {
        assert_eq!(engine_of("postgres://h/db"), Ok(Engine::Postgres));
        assert_eq!(engine_of("postgresql://h/db"), Ok(Engine::Postgres));
        assert_eq!(engine_of("sqlite:///data/r.db"), Ok(Engine::Sqlite));
        assert_eq!(engine_of("sqlite:r.db"), Ok(Engine::Sqlite));
        let err = engine_of("mysql://u:secret@h/db").unwrap_err();
        assert!(err.contains("mysql://u:***@h/db"), "{err}");
        assert!(!err.contains("secret"), "{err}");
    }

    #[test]
    fn passwords_are_masked() {
        for (url, shown) in [
            (
                "postgres://ferro:s3cret@db:5432/ferroclaw",
                "postgres://ferro:***@db:5432/ferroclaw",
            ),
            ("postgres://ferro@db/f", "postgres://ferro@db/f"),
            ("postgres://db/f", "postgres://db/f"),
            ("postgres://u:p/a@ss@db/f", "postgres://u:***@db/f"),
            (
                "postgres://db/f?user=u&password=p&sslmode=require",
                "postgres://db/f?user=u&password=***&sslmode=require",
            ),
            ("sqlite:///var/x.db", "sqlite:///var/x.db"),
            ("sqlite:x.db", "sqlite:x.db"),
        ] {
            assert_eq!(masked(url), shown, "{url}");
        }
    }
}
