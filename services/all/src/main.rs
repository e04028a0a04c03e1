//! `ferroclaw-services`: the services image's one binary. It is the gateway, the runner,
//! delivery, the scheduler or the `ferroclaw` CLI, chosen by the name it runs under
//! (`/ferroclaw-runner` is a link to it) or else by its first argument
//! (`ferroclaw-services runner --config …`). One copy of the shared dependencies instead of
//! five; the separate binaries cargo builds behave the same.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Program {
    Gateway,
    Runner,
    Delivery,
    Scheduler,
    Cli,
}

impl Program {
    const ALL: [Program; 5] = [
        Program::Gateway,
        Program::Runner,
        Program::Delivery,
        Program::Scheduler,
        Program::Cli,
    ];

    /// The binary's name, as cargo builds it and as the image links it.
    fn binary(self) -> &'static str {
        match self {
            Program::Gateway => "ferroclaw-gateway",
            Program::Runner => "ferroclaw-runner",
            Program::Delivery => "ferroclaw-delivery",
            Program::Scheduler => "ferroclaw-scheduler",
            Program::Cli => "ferroclaw",
        }
    }

    /// `ferroclaw-runner` or `runner` (`ferroclaw` or `cli` for the CLI).
    fn named(name: &str) -> Option<Program> {
        let short = |p: Program| match p {
            Program::Cli => "cli",
            p => &p.binary()["ferroclaw-".len()..],
        };
        Self::ALL
            .into_iter()
            .find(|p| name == p.binary() || name == short(*p))
    }
}

/// The command line of the four services (the same as their own binaries').
#[derive(Parser)]
#[command(version)]
struct ServiceArgs {
    /// Config file (default: $FERROCLAW_CONFIG, else ./ferroclaw.toml when present).
    #[arg(long)]
    config: Option<PathBuf>,
}

impl ServiceArgs {
    fn parse_for(program: Program, about: &'static str, args: Vec<OsString>) -> Self {
        let matches = Self::command()
            .name(program.binary())
            .bin_name(program.binary())
            .about(about)
            .get_matches_from(args);
        Self::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
    }
}

const USAGE: &str = "\
ferroclaw-services: ferroclaw's services in one binary.

Usage: ferroclaw-services PROGRAM [ARGS]...
   or: run it under a program's name (a link named ferroclaw-runner, …)

Programs:
  gateway    (ferroclaw-gateway)    REST API, webhooks and gRPC ingress
  runner     (ferroclaw-runner)     sessions, session directories and agents
  delivery   (ferroclaw-delivery)   the outbound ledger and channel senders
  scheduler  (ferroclaw-scheduler)  scheduled tasks
  ferroclaw  (cli)                  the operator CLI

`ferroclaw-services PROGRAM --help` describes a program's options.
";

/// Which program `args` asks for, and its arguments (the program's own name first).
fn choose(mut args: Vec<OsString>) -> Result<(Program, Vec<OsString>), ExitCode> {
    let invoked = args
        .first()
        .map(Path::new)
        .and_then(Path::file_name)
        .and_then(|n| n.to_str())
        .and_then(Program::named);
    if let Some(program) = invoked {
        return Ok((program, args));
    }
    let first = args.get(1).and_then(|a| a.to_str()).unwrap_or_default();
    if let Some(program) = Program::named(first) {
        args.remove(0);
        args[0] = program.binary().into();
        return Ok((program, args));
    }
    match first {
        "-h" | "--help" | "help" => {
            print!("{USAGE}");
            Err(ExitCode::SUCCESS)
        }
        "-V" | "--version" => {
            println!("ferroclaw-services {}", env!("CARGO_PKG_VERSION"));
            Err(ExitCode::SUCCESS)
        }
        "" => {
            eprint!("{USAGE}");
            Err(ExitCode::from(2))
        }
        other => {
            eprint!("error: no program named {other:?}\n\n{USAGE}");
            Err(ExitCode::from(2))
        }
    }
}

async fn run(program: Program, args: Vec<OsString>) -> anyhow::Result<()> {
    match program {
        Program::Cli => ferroclaw_cli::main_from(args).await,
        Program::Gateway => {
            let about = "ferroclaw gateway: REST API, webhooks and gRPC ingress.";
            let args = ServiceArgs::parse_for(program, about, args);
            ferroclaw_gateway::serve(args.config.as_deref()).await
        }
        Program::Runner => {
            let about = "ferroclaw runner: sessions, session directories and agents.";
            let args = ServiceArgs::parse_for(program, about, args);
            ferroclaw_runner::serve(args.config.as_deref()).await
        }
        Program::Delivery => {
            let about = "ferroclaw delivery: the outbound ledger and channel senders.";
            let args = ServiceArgs::parse_for(program, about, args);
            ferroclaw_delivery::serve(args.config.as_deref()).await
        }
        Program::Scheduler => {
            let about = "ferroclaw scheduler: scheduled tasks.";
            let args = ServiceArgs::parse_for(program, about, args);
            ferroclaw_scheduler::serve(args.config.as_deref()).await
        }
    }
}

fn main() -> anyhow::Result<ExitCode> {
    let (program, args) = match choose(std::env::args_os().collect()) {
        Ok(chosen) => chosen,
        Err(code) => return Ok(code),
    };
    // What `#[tokio::main]` builds for each of the separate binaries.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let ran = runtime.block_on(run(program, args));
    // A read stuck on a file an agent planted (runner) holds a blocking thread, which a
    // plain drop of the runtime would wait for without end.
    runtime.shutdown_timeout(ferroclaw_runner::BLOCKING_GRACE);
    ran?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn the_name_it_runs_under_chooses() {
        let (program, rest) = choose(args(&["/ferroclaw-runner", "--config", "x"])).unwrap();
        assert_eq!(program, Program::Runner);
        assert_eq!(rest, args(&["/ferroclaw-runner", "--config", "x"]));
        let (program, _) = choose(args(&["ferroclaw", "probe", "tcp://x:1"])).unwrap();
        assert_eq!(program, Program::Cli);
    }

    #[test]
    fn else_the_first_argument_chooses() {
        let (program, rest) = choose(args(&["/ferroclaw-services", "scheduler", "-V"])).unwrap();
        assert_eq!(program, Program::Scheduler);
        assert_eq!(rest, args(&["ferroclaw-scheduler", "-V"]));
        let (program, rest) =
            choose(args(&["ferroclaw-services", "ferroclaw", "probe", "x"])).unwrap();
        assert_eq!(program, Program::Cli);
        assert_eq!(rest, args(&["ferroclaw", "probe", "x"]));
        let (program, _) = choose(args(&["ferroclaw-services", "ferroclaw-gateway"])).unwrap();
        assert_eq!(program, Program::Gateway);
    }

    #[test]
    fn no_program_is_a_usage_error() {
        assert_eq!(
            choose(args(&["ferroclaw-services"])).unwrap_err(),
            ExitCode::from(2)
        );
        assert_eq!(
            choose(args(&["ferroclaw-services", "nope"])).unwrap_err(),
            ExitCode::from(2)
        );
        assert_eq!(
            choose(args(&["ferroclaw-services", "--help"])).unwrap_err(),
            ExitCode::SUCCESS
        );
    }
}
