//! A throwaway PostgreSQL for tests (feature `test-postgres`, never in release binaries).
//!
//! One cluster per test process, made on first use in a temp directory with Debian's
//! `postgresql` binaries: `initdb`, then `postgres` on a free port, listening on 127.0.0.1
//! only with its socket in the directory, password auth, no fsync. PostgreSQL refuses to run
//! as root, so as root both run as the `postgres` user. The server is tied to the test
//! process (parent-death signal) and removed when it exits; directories left by a killed
//! run are removed by the next one. Each test asks for a database of its own.
//!
//! It also accepts TLS when the `openssl` command is there to make it a certificate: a
//! throwaway CA signs one for 127.0.0.1, and [`Cluster::ca_file`] names the CA, so a test
//! can connect with `sslmode=verify-full`.
//!
//! Without PostgreSQL the tests that want it skip with a message, unless
//! `FERROCLAW_REQUIRE_POSTGRES=1` (CI), where they fail.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use sqlx::Connection;

use crate::service_db::{Location, Schema};

/// Where this process's cluster's directories start.
const DIR_PREFIX: &str = "ferroclaw-pg-";

/// A running throwaway cluster.
#[derive(Debug)]
pub struct Cluster {
    dir: PathBuf,
    port: u16,
    password: String,
    pid: u32,
    /// The CA that signed the server's certificate, when TLS is on.
    ca: Option<PathBuf>,
}

static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();
static DATABASES: AtomicU32 = AtomicU32::new(0);

/// The process's cluster, started on first use. `None` (after saying why on stderr) when
/// PostgreSQL is not installed or would not start; a panic instead when
/// `FERROCLAW_REQUIRE_POSTGRES=1`.
pub fn cluster() -> Option<&'static Cluster> {
    match CLUSTER.get_or_init(Cluster::start) {
        Ok(cluster) => Some(cluster),
        Err(why) if required() => panic!("FERROCLAW_REQUIRE_POSTGRES=1, but {why}"),
        Err(why) => {
            eprintln!("skipping the PostgreSQL half of this test: {why}");
            None
        }
    }
}

fn required() -> bool {
    std::env::var("FERROCLAW_REQUIRE_POSTGRES").is_ok_and(|v| v == "1")
}

/// The store locations a test runs against: a SQLite file `<name>.db` in `dir`, and a
/// fresh PostgreSQL database when PostgreSQL is available.
pub async fn locations(dir: &Path, name: &str) -> Vec<Location> {
    let mut at = vec![Location::Sqlite(dir.join(format!("{name}.db")))];
    if let Some(cluster) = cluster() {
        let url = cluster
            .create_database(name)
            .await
            .unwrap_or_else(|e| panic!("creating a test database on {cluster:?}: {e}"));
        at.push(Location::Postgres(url));
    }
    at
}

impl Cluster {
    /// The URL of `database` (with the superuser's password).
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://postgres:{}@127.0.0.1:{}/{database}",
            self.password, self.port
        )
    }

    /// The CA file that verifies the server (`sslrootcert`), when the cluster has TLS
    /// (it needs the `openssl` command to make its certificate).
    pub fn ca_file(&self) -> Option<&Path> {
        self.ca.as_deref()
    }

    /// A new empty database named after `name` (and a counter); its URL.
    pub async fn create_database(&self, name: &str) -> Result<String, sqlx::Error> {
        let n = DATABASES.fetch_add(1, Ordering::Relaxed);
        let clean: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .take(40)
            .collect();
        let database = format!("t{n}_{clean}");
        let mut conn = sqlx::postgres::PgConnection::connect(&self.url("postgres")).await?;
        sqlx::query(&format!("CREATE DATABASE \"{database}\""))
            .execute(&mut conn)
            .await?;
        conn.close().await?;
        Ok(self.url(&database))
    }

    fn start() -> Result<Self, String> {
        let bin = bin_dir().ok_or(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb and no initdb \
             on PATH; Debian's package is `postgresql`)",
        )?;
        remove_stale_clusters();
        let dir = std::env::temp_dir().join(format!(
            "{DIR_PREFIX}{}-{}",
            std::process::id(),
            crate::ids::new_id("c")
        ));
        std::fs::create_dir_all(dir.join("sock")).map_err(|e| format!("{}: {e}", dir.display()))?;
        let cluster = Self::start_in(&bin, dir.clone());
        if cluster.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        cluster
    }

    fn start_in(bin: &Path, dir: PathBuf) -> Result<Self, String> {
        let password = crate::ids::new_id("pw");
        let pwfile = dir.join("pwfile");
        std::fs::write(&pwfile, &password).map_err(|e| format!("{}: {e}", pwfile.display()))?;
        let as_postgres = as_postgres_user()?;
        if let Some((uid, gid)) = as_postgres {
            chown_tree(&dir, uid, gid)?;
        }
        let data = dir.join("data");
        let mut initdb = run_as(as_postgres.is_some(), &bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=scram-sha-256", "--no-sync"])
            .args(["--encoding=UTF8", "--locale=C.UTF-8"])
            .arg(format!("--pwfile={}", pwfile.display()));
        let out = initdb
            .output()
            .map_err(|e| format!("cannot run initdb: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let tls = match server_certificate(&dir.join("tls")) {
            Ok(tls) => Some(tls),
            Err(why) => {
                eprintln!("the test PostgreSQL runs without TLS: {why}");
                None
            }
        };
        if let (Some((uid, gid)), Some(_)) = (as_postgres, &tls) {
            chown_tree(&dir.join("tls"), uid, gid)?;
        }
        let port = free_port()?;
        let log = std::fs::File::create(dir.join("postgres.log"))
            .map_err(|e| format!("postgres.log: {e}"))?;
        let mut postgres = run_as(as_postgres.is_some(), &bin.join("postgres"));
        postgres
            .arg("-D")
            .arg(&data)
            .arg("-p")
            .arg(port.to_string())
            .arg("-k")
            .arg(dir.join("sock"))
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off", "-c", "max_connections=300"]);
        if let Some(tls) = &tls {
            postgres
                .args(["-c", "ssl=on"])
                .arg("-c")
                .arg(format!("ssl_cert_file={}", tls.cert.display()))
                .arg("-c")
                .arg(format!("ssl_key_file={}", tls.key.display()));
        }
        postgres
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);
        let pid = spawn_tied_to_process(postgres)?;
        let cluster = Self {
            dir,
            port,
            password,
            pid,
            ca: tls.map(|t| t.ca),
        };
        // From here the cluster is removed at exit, started or not.
        register_cleanup(cluster.pid, cluster.dir.clone());
        cluster.wait_ready(&bin.join("pg_isready"))?;
        Ok(cluster)
    }

    fn wait_ready(&self, pg_isready: &Path) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = Command::new(pg_isready)
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline || !alive(self.pid) {
                let log =
                    std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default();
                return Err(format!("postgres did not start:\n{log}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The server's TLS files.
struct ServerTls {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

/// Makes a throwaway CA in `dir` and a certificate it signs for 127.0.0.1 (P-256 keys,
/// valid two days), with the `openssl` command.
fn server_certificate(dir: &Path) -> Result<ServerTls, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let openssl = |args: &[&str]| -> Result<(), String> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .map_err(|e| format!("cannot run openssl: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "openssl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    };
    let p256 = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec![
        "req",
        "-x509",
        "-days",
        "2",
        "-subj",
        "/CN=ferroclaw test CA",
    ];
    ca.extend(p256);
    ca.extend(["-keyout", "ca.key", "-out", "ca.pem"]);
    openssl(&ca)?;
    let mut request = vec!["req", "-subj", "/CN=127.0.0.1"];
    request.extend(p256);
    request.extend(["-keyout", "server.key", "-out", "server.csr"]);
    openssl(&request)?;
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName = IP:127.0.0.1, DNS:localhost\nextendedKeyUsage = serverAuth\n",
    )
    .map_err(|e| e.to_string())?;
    openssl(&[
        "x509",
        "-req",
        "-days",
        "2",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-extfile",
        "server.ext",
        "-out",
        "server.crt",
    ])?;
    // PostgreSQL refuses a key others may read.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        dir.join("server.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .map_err(|e| e.to_string())?;
    Ok(ServerTls {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.crt"),
        key: dir.join("server.key"),
    })
}

/// The newest `/usr/lib/postgresql/<version>/bin`, else the directory of `initdb` on PATH.
fn bin_dir() -> Option<PathBuf> {
    let versioned = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .max_by_key(|(version, _)| *version)
        .map(|(_, bin)| bin);
    versioned.or_else(|| {
        std::env::split_paths(&std::env::var_os("PATH")?)
            .find(|dir| dir.join("initdb").is_file() && dir.join("postgres").is_file())
    })
}

/// As root: the `postgres` user's ids (PostgreSQL will not run as root).
fn as_postgres_user() -> Result<Option<(u32, u32)>, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let id = |flag: &str| -> Result<u32, String> {
        let out = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .map_err(|e| format!("id {flag} postgres: {e}"))?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .map_err(|_| "running as root, and there is no `postgres` user to run it as".into())
    };
    Ok(Some((id("-u")?, id("-g")?)))
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> Result<(), String> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .map_err(|e| format!("chown {}: {e}", path.display()))?;
    if path.is_dir() {
        for entry in std::fs::read_dir(path).map_err(|e| e.to_string())? {
            chown_tree(&entry.map_err(|e| e.to_string())?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// `program` (through util-linux's `setpriv`), as the `postgres` user when `switch` (root),
/// and sent SIGQUIT (PostgreSQL's immediate shutdown) when its parent dies.
fn run_as(switch: bool, program: &Path) -> Command {
    let mut command = Command::new("setpriv");
    if switch {
        command.args(["--reuid=postgres", "--regid=postgres", "--clear-groups"]);
    }
    command.args(["--pdeathsig=QUIT", "--"]).arg(program);
    command
}

fn free_port() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(listener.local_addr().map_err(|e| e.to_string())?.port())
}

/// Starts `command` from a thread that lives as long as the child: the parent-death
/// signal follows the spawning thread, and test threads come and go.
fn spawn_tied_to_process(mut command: Command) -> Result<u32, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || match command.spawn() {
        Ok(mut child) => {
            let _ = tx.send(Ok(child.id()));
            let _ = child.wait();
        }
        Err(e) => {
            let _ = tx.send(Err(format!("cannot start postgres: {e}")));
        }
    });
    rx.recv()
        .map_err(|_| "the postgres starter thread died".to_string())?
}

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

static CLEANUP: OnceLock<(u32, PathBuf)> = OnceLock::new();

/// Stops the server and removes its directory when the process exits.
fn register_cleanup(pid: u32, dir: PathBuf) {
    extern "C" fn at_exit() {
        if let Some((pid, dir)) = CLEANUP.get() {
            stop(*pid, dir);
        }
    }
    if CLEANUP.set((pid, dir)).is_ok() {
        // SAFETY: registers a plain `extern "C"` function.
        unsafe { libc::atexit(at_exit) };
    }
}

/// Immediate shutdown, then the directory goes.
fn stop(pid: u32, dir: &Path) {
    // SAFETY: signals the server this harness started.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGQUIT) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Clusters of test processes that died without cleaning up.
fn remove_stale_clusters() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(owner) = name
            .to_str()
            .and_then(|n| n.strip_prefix(DIR_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if alive(owner) {
            continue;
        }
        let dir = entry.path();
        // The server may have outlived its test process (a parent-death signal is lost
        // when the server is still starting).
        let server = std::fs::read_to_string(dir.join("data/postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<u32>().ok()));
        match server {
            Some(pid) if alive(pid) => stop(pid, &dir),
            _ => {
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
    }
}

/// Checks a freshly opened service database holds exactly `schema`'s migrations, then
/// records one from the future in it, so that the caller, after closing its pool, can
/// check that opening it again is refused.
pub async fn check_migrations_then_add_a_future_one(
    pool: &sqlx::AnyPool,
    schema: &Schema,
    at: &Location,
) {
    let versions: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations ORDER BY version")
            .fetch_all(pool)
            .await
            .expect("the migrations table");
    let known: Vec<i64> = schema
        .steps(at.engine())
        .iter()
        .map(|s| s.version)
        .collect();
    assert_eq!(versions, known, "{at:?}");
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum,
            execution_time) VALUES (9999, 'from the future', TRUE, $1, 0)",
    )
    .bind(vec![0u8; 48])
    .execute(pool)
    .await
    .expect("a future migration recorded");
}
