//! `kpr`: thin entry point; each subcommand lives in its own module.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;

use kpr::agent::{self, AgentConfig};
use kpr::cli::{AgentArgs, Cli, Command, CtCommand, OutputFormat, SvcCommand};
use kpr::datapath::kernel::KernelMaps;
use kpr::datapath::loader;
use kpr::datapath::LbMaps;
use kpr::{selftest, status, svc_list, testbed};

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KPR_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kpr: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<ExitCode> {
    match command {
        Command::Agent(args) => run_agent(*args).map(|()| ExitCode::SUCCESS),
        Command::Svc {
            command: SvcCommand::List { bpf_root, output },
        } => {
            let maps = KernelMaps::open(&bpf_root.bpf_root).with_context(|| {
                format!(
                    "no kpr maps under {} (has an agent run with this --bpf-root?)",
                    bpf_root.bpf_root.display()
                )
            })?;
            let rows = svc_list::rows(&maps.snapshot()?);
            print!(
                "{}",
                match output {
                    OutputFormat::Table => svc_list::format_table(&rows),
                    OutputFormat::Json => svc_list::format_json(&rows),
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Ct {
            command: CtCommand::List { bpf_root, output },
        } => {
            let ct = kpr::datapath::ct::CtMap::open(&bpf_root.bpf_root)?;
            let entries = ct.entries()?;
            match output {
                OutputFormat::Table => print!(
                    "{}",
                    kpr::datapath::ct::format_table(&entries, kpr::datapath::ct::monotonic_ns())
                ),
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&entries)?),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Cleanup(args) => {
            let report = loader::cleanup(&args.bpf_root.bpf_root)?;
            let unpinned = match &args.cgroup {
                Some(cgroup) => loader::detach_from_cgroup(cgroup)?,
                None => Vec::new(),
            };
            println!(
                "detached {} program links, removed {} pins{}",
                report.detached.len() + unpinned.len(),
                report.removed_pins.len(),
                if report.unmounted {
                    ", unmounted bpffs"
                } else {
                    ""
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Status {
            bpf_root,
            metrics_addr,
            output,
        } => {
            let report = status::gather(metrics_addr, &bpf_root.bpf_root);
            match output {
                OutputFormat::Table => print!("{}", status::format_text(&report)),
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Selftest => selftest::run(),
        Command::Probe { spec } => testbed::probe::probe_main(&spec).map(|()| ExitCode::SUCCESS),
    }
}

/// `kpr agent`: the agent on a two-thread runtime until it is asked to stop.
fn run_agent(args: AgentArgs) -> Result<()> {
    let config = AgentConfig::from_args(args)?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(agent::run(config))
}
