//! `kpr`: thin entry point. Parses the command line, sets up logging and
//! dispatches each subcommand to the module that implements it; the
//! functions here only choose the output format.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;

use kpr::agent::{self, AgentConfig};
use kpr::bpf_root::{Owner, OwnerError};
use kpr::cli::{AgentArgs, CleanupArgs, Cli, Command, CtCommand, OutputFormat, SvcCommand};
use kpr::datapath::kernel::KernelMaps;
use kpr::datapath::{ct, loader, LbMaps};
use kpr::{preflight, selftest, status, svc_list};

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
        Command::Agent(args) => run_agent(*args)?,
        Command::Svc {
            command: SvcCommand::List { bpf_root, output },
        } => svc_list(&bpf_root.bpf_root, output)?,
        Command::Ct {
            command: CtCommand::List { bpf_root, output },
        } => ct_list(&bpf_root.bpf_root, output)?,
        Command::Cleanup(args) if args.kube_proxy => {
            println!("{}", kpr::kube_proxy_cleanup::cleanup()?.summary())
        }
        Command::Cleanup(args) => cleanup(&args)?,
        Command::Status {
            bpf_root,
            metrics_addr,
            output,
        } => return show_status(metrics_addr, &bpf_root.bpf_root, output),
        Command::Selftest => return selftest::run(),
        Command::Probe { spec } => selftest::probe::probe_main(&spec)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// `kpr agent`: the checks of [`preflight`] (nothing is touched before they
/// pass), then the agent on a two-thread runtime until it is asked to stop.
fn run_agent(args: AgentArgs) -> Result<()> {
    // Two arenas for two runtime threads: freed memory is reused across
    // threads instead of kept resident per arena.
    kpr::sys::limit_malloc_arenas(2);
    preflight::ignore_sighup()?;
    let nofile = preflight::raise_nofile_limit()?;
    tracing::debug!(nofile, "descriptor limit");
    let force_cgroup_change = args.force_cgroup_change;
    let config = AgentConfig::from_args(args)?;
    let held = preflight::check(&preflight::Input {
        cgroup: &config.cgroup,
        bpf_root: &config.bpf_root,
        metrics_addr: config.metrics_addr,
        healthz_addr: config.healthz_addr,
        map_sizes: config.map_sizes,
        force_cgroup_change,
    })?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(async {
            tokio::spawn(preflight::log_sighups());
            agent::run(config, held).await
        })
}

/// `kpr svc list`.
fn svc_list(bpf_root: &Path, output: OutputFormat) -> Result<()> {
    let maps = KernelMaps::open(bpf_root).with_context(|| {
        format!(
            "no kpr maps under {} (has an agent run with this --bpf-root?)",
            bpf_root.display()
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
    Ok(())
}

/// `kpr ct list`.
fn ct_list(bpf_root: &Path, output: OutputFormat) -> Result<()> {
    let entries = ct::CtMap::open(bpf_root)?.entries()?;
    match output {
        OutputFormat::Table => print!("{}", ct::format_table(&entries, ct::monotonic_ns())),
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&entries)?),
    }
    Ok(())
}

/// `kpr cleanup`: refused while an agent holds the bpf root, unless
/// `--force`; the root is held while cleaning up, so no agent starts meanwhile.
fn cleanup(args: &CleanupArgs) -> Result<()> {
    let _owner = match Owner::acquire(&args.bpf_root.bpf_root) {
        Ok(owner) => Some(owner),
        Err(e @ OwnerError::Held { .. }) if !args.force => {
            return Err(anyhow::Error::from(e).context(
                "refusing to clean up under a running agent (stop it first, or pass --force)",
            ))
        }
        Err(_) => None,
    };
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
    Ok(())
}

/// `kpr status`: exits 1 when the agent reports problems (Services it
/// could not program), so scripts and probes can tell.
fn show_status(
    metrics_addr: SocketAddr,
    bpf_root: &Path,
    output: OutputFormat,
) -> Result<ExitCode> {
    let report = status::gather(metrics_addr, bpf_root);
    match output {
        OutputFormat::Table => print!("{}", status::format_text(&report)),
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
    }
    Ok(if report.has_problems() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
