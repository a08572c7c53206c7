//! `kpr`: thin entry point; each subcommand lives in its own module.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;

use kpr::agent::{self, AgentConfig, KubeSourceConfig, SourceConfig};
use kpr::cli::{AgentArgs, Cli, Command, CtCommand, OutputFormat, SvcCommand};
use kpr::datapath::kernel::KernelMaps;
use kpr::datapath::loader::{self, MapSizes};
use kpr::datapath::nodeport::{Acceleration, CtTimeouts, NodePortConfig, NodePortMode};
use kpr::datapath::LbMaps;
use kpr::maglev::MaglevParams;
use kpr::model::LbAlgorithm;
use kpr::source::kube::ApiConfig;
use kpr::{host, selftest, status, svc_list, testbed};

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

fn run_agent(args: AgentArgs) -> Result<()> {
    let cgroup = match args.cgroup {
        Some(c) => c,
        None => {
            host::cgroup2_mount().context("finding the cgroup2 mount for the default --cgroup")?
        }
    };
    let node_name = match args.node_name.or_else(|| std::env::var("NODE_NAME").ok()) {
        Some(n) => n,
        None => nix::unistd::gethostname()
            .context("no --node-name, no $NODE_NAME and no hostname")?
            .to_string_lossy()
            .into_owned(),
    };
    let source = if args.manifests.is_empty() {
        SourceConfig::Kubernetes(KubeSourceConfig {
            api: ApiConfig {
                kubeconfig: args.kubeconfig,
                api_server: args.k8s_api_server,
            },
            min_sync_period: args.min_sync_period,
            sync_period: args.sync_period,
        })
    } else {
        SourceConfig::Manifests(args.manifests)
    };
    let secs = |d: Duration| u32::try_from(d.as_secs().max(1)).unwrap_or(u32::MAX);
    // The size was checked by the flag's parser; this cannot fail.
    let maglev = MaglevParams::new(args.maglev_table_size, args.maglev_hash_seed)?;
    let nodeport = (!args.devices.is_empty()).then(|| NodePortConfig {
        devices: args.devices.clone(),
        mode: args.nodeport_mode,
        acceleration: args.nodeport_acceleration,
        snat_ports: args.nodeport_snat_ports,
        no_backend: args.service_no_backend_response,
        redirect_peer: args.nodeport_redirect_peer,
        timeouts: CtTimeouts {
            tcp_syn: secs(args.ct_tcp_syn_timeout),
            tcp: secs(args.ct_tcp_timeout),
            tcp_closing: secs(args.ct_tcp_closing_timeout),
            udp: secs(args.ct_udp_timeout),
        },
        maglev,
    });
    if nodeport.is_none()
        && (args.nodeport_mode != NodePortMode::Snat
            || args.nodeport_acceleration != Acceleration::Disabled)
    {
        anyhow::bail!("--nodeport-mode and --nodeport-acceleration need --devices");
    }
    if nodeport.is_none() && args.lb_algorithm == LbAlgorithm::Maglev {
        anyhow::bail!(
            "--lb-algorithm maglev needs --devices (it selects backends for north-south traffic)"
        );
    }
    let config = AgentConfig {
        source,
        cgroup,
        bpf_root: args.bpf_root.bpf_root,
        metrics_addr: args.metrics_addr,
        healthz_addr: args.healthz_addr,
        map_sizes: MapSizes {
            services: args.lb_map_max,
            backends: args.lb_map_max,
            source_ranges: args.lb_map_max,
            ct: args.ct_map_max,
            maglev: args.lb_map_max,
            ..MapSizes::default()
        },
        nodeport,
        ct_gc_interval: args.ct_gc_interval,
        debounce: Duration::from_millis(args.debounce_ms),
        kpr_mode: args.kube_proxy_replacement,
        node_name,
        node_ips: args.node_ips,
        health_check_bind: args.health_check_bind_address,
        lb_algorithm: args.lb_algorithm,
        maglev,
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(agent::run(config))
}
