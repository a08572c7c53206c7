//! `kpr`: thin entry point. Parses the command line, sets up logging and
//! dispatches each subcommand to the module that implements it; the
//! functions here only choose the output format.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser};

use kpr::agent::{self, AgentConfig};
use kpr::bpf_root::{Owner, OwnerError};
use kpr::cli::{
    AgentArgs, CleanupArgs, Cli, Command, CtCommand, LogFormat, OutputFormat, SvcCommand,
};
use kpr::datapath::kernel::KernelMaps;
use kpr::datapath::{ct, loader, LbMaps};
use kpr::{preflight, selftest, status, svc_list};

fn main() -> ExitCode {
    let cli = parse();
    let log_format = match &cli.command {
        Command::Agent(args) => args.log_format,
        _ => LogFormat::Text,
    };
    init_logging(log_format);
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            match log_format {
                // Every stderr line of a JSON-logging agent is JSON, its last words too.
                LogFormat::Json => tracing::error!("kpr: error: {e:#}"),
                LogFormat::Text => eprintln!("kpr: error: {e:#}"),
            }
            ExitCode::FAILURE
        }
    }
}

/// The command line; a usage error of `kpr status` exits 3, its "unknown"
/// (see `kpr::status::outcome`: 2 means the agent is unreachable there),
/// any other as clap's (2).
fn parse() -> Cli {
    Cli::try_parse().unwrap_or_else(|e| {
        let in_status = std::env::args_os().nth(1).is_some_and(|a| a == "status");
        if e.use_stderr() && in_status {
            let _ = e.print();
            std::process::exit(i32::from(status::outcome::EXIT_UNKNOWN));
        }
        e.exit()
    })
}

/// Log lines to stderr, filtered by $KPR_LOG (default `info`), as text or
/// as one JSON object per line (`--log-format`).
fn init_logging(format: LogFormat) {
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KPR_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
}
fn run(command: Command) -> Result<ExitCode> {
    match command {
        Command::Agent(args) => run_agent(*args)?,
        Command::Svc {
            command:
                SvcCommand::List {
                    bpf_root,
                    output,
                    verify: true,
                },
        } => return Ok(svc_verify(&bpf_root.bpf_root, output)),
        Command::Svc {
            command: SvcCommand::List {
                bpf_root, output, ..
            },
        } => svc_list(&bpf_root.bpf_root, output)?,
        Command::Ct {
            command: CtCommand::List { bpf_root, output },
        } => ct_list(&bpf_root.bpf_root, output)?,
        Command::Explain(args) => explain(&args)?,
        Command::Cleanup(args) if args.kube_proxy => {
            println!("{}", kpr::kube_proxy_cleanup::cleanup()?.summary())
        }
        Command::Cleanup(args) => cleanup(&args)?,
        Command::Monitor(args) => monitor(&args)?,
        Command::Status {
            bpf_root,
            metrics_addr,
            output,
        } => return Ok(show_status(metrics_addr, &bpf_root.bpf_root, output)),
        Command::Completion { shell } => completion(shell)?,
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
    // Large transient buffers go back to the kernel when dropped.
    kpr::sys::mmap_large_allocations(256 << 10);
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
/// `kpr monitor`: events until a bound or a signal, then the summary on stderr.
fn monitor(args: &kpr::cli::MonitorArgs) -> Result<()> {
    let json = args.output == OutputFormat::Json;
    let opts = kpr::monitor::Options {
        bpf_root: args.bpf_root.bpf_root.clone(),
        json,
        filters: kpr::monitor::Filters {
            frontend: args.frontend.clone(),
            service: args.service.clone(),
            backend: args.backend.clone(),
            verdict: args.verdict,
        },
        count: args.count,
        duration: args.duration,
        budget: kpr::monitor::Budget {
            sample_every: args.sample_every,
            rate: args.rate,
            burst: args.burst,
        },
    };
    let summary = kpr::monitor::run(&opts)?;
    eprintln!("{}", kpr::monitor::summary_line(&summary, json));
    Ok(())
}

fn svc_list(bpf_root: &Path, output: OutputFormat) -> Result<()> {
    let maps = KernelMaps::open(bpf_root).with_context(|| {
        format!(
            "no kpr maps under {} (has an agent run with this --bpf-root?)",
            bpf_root.display()
        )
    })?;
    // Names are a help, not a need: the maps are listed without them.
    let names = match kpr::applied_state::read(bpf_root) {
        Ok(state) => state.map(|s| s.names()).unwrap_or_default(),
        Err(e) => {
            eprintln!("kpr: warning: no Service names: {e:#}");
            Default::default()
        }
    };
    let rows = svc_list::rows(&maps.snapshot()?, &names);
    print!(
        "{}",
        match output {
            OutputFormat::Table => svc_list::format_table(&rows),
            OutputFormat::Json => svc_list::format_json(&rows),
        }
    );
    Ok(())
}

/// `kpr svc list --verify`: 0 in sync, 1 differences, 2 nothing to compare.
fn svc_verify(bpf_root: &Path, output: OutputFormat) -> ExitCode {
    let compared = (|| -> Result<_> {
        let record = kpr::applied_state::read(bpf_root)?.with_context(|| {
            format!(
                "no record of an agent's sync for --bpf-root {} (none has synced since boot, \
                 or kpr cleanup ran)",
                bpf_root.display()
            )
        })?;
        let maps = KernelMaps::open(bpf_root)
            .with_context(|| format!("no kpr maps under {}", bpf_root.display()))?;
        let snapshot = maps.snapshot()?;
        let diffs = kpr::verify::compare(&record, &snapshot, &|id| {
            maps.maglev_table(id).ok().flatten()
        });
        Ok((record, diffs))
    })();
    let (record, diffs) = match compared {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kpr: error: {e:#}");
            return ExitCode::from(2);
        }
    };
    match output {
        OutputFormat::Table => print!("{}", kpr::verify::format_text(&record, &diffs)),
        OutputFormat::Json => println!(
            "{}",
            serde_json::json!({
                "in_sync": diffs.is_empty(),
                "record_written_at": record.written_at,
                "frontends": record.frontends.len(),
                "refused": record.refused,
                "differences": diffs,
            })
        ),
    }
    ExitCode::from(u8::from(!diffs.is_empty()))
}

/// `kpr explain`.
fn explain(args: &kpr::cli::ExplainArgs) -> Result<()> {
    let bpf_root = &args.bpf_root.bpf_root;
    let maps = KernelMaps::open(bpf_root).with_context(|| {
        format!(
            "no kpr maps under {} (has an agent run with this --bpf-root?)",
            bpf_root.display()
        )
    })?;
    let record = kpr::applied_state::read(bpf_root).unwrap_or_else(|e| {
        eprintln!("kpr: warning: no record of the agent: {e:#}");
        None
    });
    let table = |id| maps.maglev_table(id).ok().flatten();
    let reader = kpr::explain::MapReader {
        maglev_table: &table,
        affinity: maps.affinity_entries()?,
        // Without the north-south datapath there is no conntrack map.
        conntrack: ct::CtMap::open(bpf_root)
            .and_then(|ct| ct.entries())
            .unwrap_or_default(),
        now_ns: ct::monotonic_ns(),
    };
    let e = kpr::explain::explain(
        args.frontend,
        args.client,
        &maps.snapshot()?,
        record.as_ref(),
        &reader,
    );
    match args.output {
        OutputFormat::Table => print!("{}", kpr::explain::format_text(&e)),
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&e)?),
    }
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

/// `kpr status`: the report, and the exit code of `kpr::status::outcome`
/// (3 when the report cannot be written).
fn show_status(metrics_addr: SocketAddr, bpf_root: &Path, output: OutputFormat) -> ExitCode {
    let report = status::gather(metrics_addr, bpf_root);
    let text = match output {
        OutputFormat::Table => Ok(status::format_text(&report)),
        OutputFormat::Json => serde_json::to_string_pretty(&report).map(|json| json + "\n"),
    };
    let written = text.map_err(std::io::Error::from).and_then(|text| {
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(text.as_bytes())?;
        stdout.flush()
    });
    match written {
        Ok(()) => ExitCode::from(report.exit_code()),
        Err(e) => {
            eprintln!("kpr: error: writing the status report: {e}");
            ExitCode::from(status::outcome::EXIT_UNKNOWN)
        }
    }
}

/// `kpr completion SHELL`.
fn completion(shell: clap_complete::Shell) -> Result<()> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "kpr", &mut script);
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(&script)
        .and_then(|()| stdout.flush())
        .context("writing the completion script")
}
