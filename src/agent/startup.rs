//! Startup: everything the agent does once before its tasks run. Checks
//! the kernel's features against --kube-proxy-replacement, loads and
//! attaches the socket-LB datapath, attaches the north-south datapath to
//! the --devices interfaces or the detected ones (or removes it, with
//! `--devices=`), and opens the host address map. Any error here stops the agent before a task starts.

use anyhow::{Context, Result};

use super::addresses::{self, AddressWatch};
use super::devices::{self, DeviceWatch};
use super::switch_over::{Growth, SwitchOver};
use super::{AgentConfig, SourceConfig};
use crate::datapath::hooks::{HookKind, SockHook};
use crate::datapath::loader;
use crate::datapath::nodeport::{self, DeviceSelection, NodePortConfig, TcAttach};
use crate::datapath::peer_devices;
use crate::datapath::resize;
use crate::features::{self, KprMode};
use crate::status::{AgentStatus, DeviceStatus, SourceKind, StatusHandle};

/// What startup hands the tasks.
pub(super) struct Started {
    /// What `kpr status` shows, with what startup found filled in.
    pub status: StatusHandle,
    /// The device watcher's start (north-south datapath only).
    pub devices: Option<DeviceWatch>,
    /// The host address watcher's start.
    pub addresses: AddressWatch,
    /// Grows the maps and switches programs over to new ones (the syncer's).
    pub switch_over: SwitchOver,
    /// What the socket-LB programs were loaded with: they are loaded the
    /// same way again when their links are lost (`pin_watch`).
    pub socket_lb: loader::DatapathOptions,
}

/// Checks the configuration and the kernel, and sets the datapath up.
pub(super) fn start(config: &AgentConfig) -> Result<Started> {
    if let Some(np) = &config.nodeport {
        np.validate()?;
    }
    let (skip_hooks, features) = check_features(config.kpr_mode)?;
    // --tc-attach resolved once: every later attachment (device changes,
    // map switch-overs) uses the same mode.
    let north_south = match &config.nodeport {
        Some(np) => Some(resolve_tc_attach(np, config.kpr_mode, &features)?),
        None => None,
    };
    let status = StatusHandle::new(initial_status(config, north_south.as_ref(), &features));
    let options = datapath_options(skip_hooks, &features);
    // An upgrade to a new layout of a map: the previous agent's programs
    // keep serving from the old maps until the new ones are filled.
    let fill_first = loader::fill_before_attach(&config.bpf_root);
    if fill_first {
        loader::create_maps(&config.bpf_root, &config.map_sizes)
            .context("creating the maps of the new layout")?;
        if let Some(np) = &north_south {
            nodeport::create_maps(&config.bpf_root, &config.map_sizes, np)
                .context("creating the north-south maps of the new layout")?;
        }
        tracing::info!("maps of a new layout created: the attached programs keep the old ones until the first sync has filled them");
    } else {
        attach_socket_lb(config, &options)?;
    }
    let growth = growth(config)?;
    let socket_lb = options.clone();
    let switch_over = SwitchOver::new(
        config.bpf_root.clone(),
        config.cgroup.clone(),
        options,
        north_south.clone(),
        config.map_sizes,
        growth,
        fill_first,
    );
    let devices = match &north_south {
        Some(np) if fill_first => Some(north_south_after_switch(config, np, &status)?),
        Some(np) => Some(attach_north_south(config, np, &status)?),
        None => {
            let detached = nodeport::remove(&config.bpf_root)
                .context("turning the north-south datapath off")?;
            if !detached.is_empty() {
                tracing::info!(
                    ?detached,
                    "--devices= (empty): north-south datapath detached"
                );
            }
            None
        }
    };
    let addresses = addresses::start(&config.bpf_root)?;
    let devices = devices.map(|mut watch| {
        watch.ready = switch_over.north_south_ready();
        watch
    });
    Ok(Started {
        status,
        devices,
        addresses,
        switch_over,
        socket_lb,
    })
}

/// How the maps grow: up to 1/32 of the node's memory, or not at all with
/// --lb-map-max.
pub(super) fn growth(config: &AgentConfig) -> Result<Growth> {
    if !config.map_growth {
        return Ok(Growth::Fixed);
    }
    let memory = resize::mem_total_bytes().context("sizing the maps' growth")?;
    Ok(Growth::Auto {
        ceiling: resize::growth_ceiling_entries(memory),
    })
}

/// Probes the kernel. Strict: any missing feature is an error naming it and
/// its kernel option. Partial: logs what is missing and returns the socket
/// hooks to leave out (bind protection goes whole when any part of it is
/// missing: it is reported, never fatal).
fn check_features(mode: KprMode) -> Result<(Vec<SockHook>, Vec<features::Feature>)> {
    let probed = features::probe();
    let missing = features::missing(&probed);
    for rules in features::kube_proxy_rules() {
        tracing::warn!(found = %rules, "kube-proxy's rules are on this node: they will intercept Service traffic too; remove kube-proxy and flush its rules");
    }
    if missing.is_empty() {
        return Ok((Vec::new(), probed));
    }
    if mode == KprMode::Strict {
        anyhow::bail!(
            "--kube-proxy-replacement strict: the kernel lacks {} required feature(s):\n  {}\n(use --kube-proxy-replacement partial to run without them)",
            missing.len(),
            missing.join("\n  ")
        );
    }
    for m in &missing {
        tracing::warn!(feature = %m, "--kube-proxy-replacement partial: running without");
    }
    let lacks = |name: &str| probed.iter().any(|f| f.name == name && !f.available);
    let mut skip = SockHook::of_kind(HookKind::Translation)
        .filter(|hook| lacks(hook.feature()))
        .collect::<Vec<_>>();
    if skip.len() == SockHook::of_kind(HookKind::Translation).count() || lacks("cgroup_sock_addr") {
        anyhow::bail!("no socket-LB hook is available: {}", missing.join("; "));
    }
    let bind_hooks: Vec<SockHook> = SockHook::of_kind(HookKind::BindProtection).collect();
    if lacks(features::NETNS_COOKIE_SOCKOPT) || bind_hooks.iter().any(|hook| lacks(hook.feature()))
    {
        tracing::warn!("--kube-proxy-replacement partial: NodePort bind protection is off (host sockets may bind NodePorts)");
        skip.extend(bind_hooks);
    }
    for hook in SockHook::of_kind(HookKind::PodSourceRanges).filter(|h| lacks(h.feature())) {
        tracing::warn!("--kube-proxy-replacement partial: pods' sockets are judged by loadBalancerSourceRanges as the node's (by the node's addresses)");
        skip.push(hook);
    }
    Ok((skip, probed))
}

/// `--tc-attach` on this kernel: `auto` becomes tcx, or classic tc where
/// tcx is missing (logged; strict mode requires nothing of tcx, classic tc
/// does the same work); `tcx` on a kernel without it is refused.
fn resolve_tc_attach(
    np: &NodePortConfig,
    mode: KprMode,
    features: &[features::Feature],
) -> Result<NodePortConfig> {
    let has_tcx = features::has_tcx(features);
    if np.tc_attach == TcAttach::Tcx && !has_tcx {
        anyhow::bail!(
            "--tc-attach tcx: the kernel has no tcx (needs CONFIG_NET_XGRESS, kernel >= 6.6); \
             use --tc-attach auto or legacy (classic tc)"
        );
    }
    let resolved = np.tc_attach.resolve(has_tcx);
    if np.tc_attach == TcAttach::Auto && resolved == TcAttach::Legacy {
        tracing::info!(
            kube_proxy_replacement = ?mode,
            tc_attach = resolved.as_str(),
            "the kernel has no tcx (CONFIG_NET_XGRESS, kernel >= 6.6): the north-south programs \
             attach through classic tc (clsact qdisc, cls_bpf direct-action filters)"
        );
    }
    Ok(NodePortConfig {
        tc_attach: resolved,
        ..np.clone()
    })
}

/// What `kpr status` shows before the first sync: the configuration (the
/// north-south one with `--tc-attach` resolved) and the kernel features
/// probed.
fn initial_status(
    config: &AgentConfig,
    north_south: Option<&NodePortConfig>,
    features: &[features::Feature],
) -> AgentStatus {
    AgentStatus {
        source: match &config.source {
            SourceConfig::Manifests(_) => SourceKind::Manifests,
            SourceConfig::Kubernetes(_) => SourceKind::Kubernetes,
        },
        api_server: match &config.source {
            SourceConfig::Kubernetes(k) => k.api.api_server.clone().or_else(|| {
                k.api
                    .kubeconfig
                    .as_ref()
                    .map(|p| format!("from {}", p.display()))
            }),
            SourceConfig::Manifests(_) => None,
        },
        node_name: Some(config.node_name.clone()),
        kube_proxy_replacement: config.kpr_mode,
        cgroup: config.cgroup.display().to_string(),
        features: features
            .iter()
            .map(|f| (f.name.to_string(), f.available))
            .collect(),
        lb_algorithm: Some(config.lb_algorithm),
        maglev_table_size: Some(config.maglev.table_size()),
        nodeport_mode: config.nodeport.as_ref().map(|np| np.mode),
        nodeport_acceleration: config.nodeport.as_ref().map(|np| np.acceleration),
        tc_attach: north_south.map(|np| np.tc_attach),
        ..AgentStatus::default()
    }
}

/// What the socket-LB programs are loaded with: without the hooks
/// `skip_hooks` names, and with the features found.
fn datapath_options(
    skip_hooks: Vec<SockHook>,
    features: &[features::Feature],
) -> loader::DatapathOptions {
    let use_set_retval = features
        .iter()
        .any(|f| f.name == "helper_set_retval" && f.available);
    // Bind protection is for the node's own sockets: those of the agent's
    // network namespace.
    let host_netns_cookie = features::own_netns_cookie().unwrap_or(0);
    loader::DatapathOptions {
        skip_hooks,
        use_set_retval,
        host_netns_cookie,
    }
}

/// Loads the socket-LB programs and attaches them to --cgroup.
fn attach_socket_lb(config: &AgentConfig, options: &loader::DatapathOptions) -> Result<()> {
    let report =
        loader::load_and_attach(&config.bpf_root, &config.cgroup, &config.map_sizes, options)
            .context("setting up the datapath")?;
    tracing::info!(
        cgroup = %config.cgroup.display(),
        bpf_root = %config.bpf_root.display(),
        reused_maps = ?report.reused_maps,
        updated_links = ?report.updated_links,
        created_links = ?report.created_links,
        "datapath attached"
    );
    Ok(())
}

/// Attaches the north-south programs to the --devices interfaces there are
/// (or the detected ones) and lists the pods' devices; what the device
/// watcher starts from.
fn attach_north_south(
    config: &AgentConfig,
    np: &NodePortConfig,
    status: &StatusHandle,
) -> Result<DeviceWatch> {
    nodeport::check_port_range(np.snat_ports);
    let events = devices::subscribe(&np.devices);
    let report = nodeport::load_and_attach(&config.bpf_root, &config.map_sizes, np)
        .context("setting up the north-south datapath")?;
    tracing::info!(
        devices = ?np.devices,
        detected = matches!(np.devices, DeviceSelection::Detected),
        attached = ?report.devices.keys().collect::<Vec<_>>(),
        mode = ?np.mode,
        tc_attach = report.tc_attach.as_str(),
        snat_ports = %np.snat_ports,
        dsr_mss = report.dsr_mss,
        reused_ct = report.reused_ct,
        updated_links = ?report.updated_links,
        created_links = ?report.created_links,
        detached_links = ?report.detached_links,
        xdp_links = ?report.xdp_links,
        "north-south datapath attached"
    );
    if !report.missing_devices.is_empty() {
        tracing::warn!(missing = ?report.missing_devices, "--devices names no interface has yet: attached when they appear");
    }
    status.update(|s| {
        s.devices = Some(DeviceStatus {
            patterns: np.devices.patterns().to_vec(),
            detected: matches!(np.devices, DeviceSelection::Detected),
            attached: report.devices.keys().cloned().collect(),
            missing: report.missing_devices.clone(),
            ..DeviceStatus::default()
        })
    });
    let mut peer_devices =
        peer_devices::open(&config.bpf_root).context("opening the peer device map")?;
    devices::sync_peer_devices(&mut peer_devices, &report.devices, np.redirect_peer);
    Ok(DeviceWatch {
        bpf_root: config.bpf_root.clone(),
        sizes: config.map_sizes,
        config: np.clone(),
        status: status.clone(),
        peer_devices,
        events,
        attached: report.devices,
        attached_mss: report.dsr_mss,
        ready: Default::default(),
    })
}

/// The device watcher's start when the north-south programs wait for the
/// new maps' first sync ([`SwitchOver`] attaches them): nothing attached
/// by this agent yet.
fn north_south_after_switch(
    config: &AgentConfig,
    np: &NodePortConfig,
    status: &StatusHandle,
) -> Result<DeviceWatch> {
    status.update(|s| {
        s.devices = Some(DeviceStatus {
            patterns: np.devices.patterns().to_vec(),
            detected: matches!(np.devices, DeviceSelection::Detected),
            ..DeviceStatus::default()
        })
    });
    Ok(DeviceWatch {
        bpf_root: config.bpf_root.clone(),
        sizes: config.map_sizes,
        config: np.clone(),
        status: status.clone(),
        peer_devices: peer_devices::open(&config.bpf_root)
            .context("opening the peer device map")?,
        events: devices::subscribe(&np.devices),
        attached: Default::default(),
        attached_mss: 0,
        ready: Default::default(),
    })
}
