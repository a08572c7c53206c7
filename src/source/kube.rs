//! The Kubernetes API source: kube-rs watchers for v1 Services,
//! discovery.k8s.io/v1 EndpointSlices and the agent's own v1 Node, turned
//! into events for the agent's `ObjectStore`. Watchers relist on 410 Gone
//! and reconnect with backoff on their own; every failure is reported so
//! it can be counted and shown by `kpr status`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::source::store::Kind;

/// What kube-proxy's informers select: Services (and their slices, which
/// carry the Service's labels) that another proxy owns, and headless ones,
/// are not watched at all.
pub const PROXYABLE: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// How to reach the API server.
#[derive(Clone, Debug, Default)]
pub struct ApiConfig {
    /// A kubeconfig file; else $KUBECONFIG, else the in-cluster config.
    pub kubeconfig: Option<PathBuf>,
    /// Overrides the server URL (Cilium's k8sServiceHost): needed where no
    /// proxy serves the `kubernetes` ClusterIP yet — kpr is that proxy.
    pub api_server: Option<String>,
}

/// A client for `config`.
pub async fn client(config: &ApiConfig) -> Result<Client> {
    let mut kube_config =
        if let Some(path) = &config.kubeconfig {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .context("loading the kubeconfig")?
        } else if std::env::var_os("KUBECONFIG").is_some() {
            kube::Config::from_kubeconfig(&Default::default())
                .await
                .context("loading $KUBECONFIG")?
        } else {
            match (kube::Config::incluster(), &config.api_server) {
                (Ok(c), _) => c,
                (Err(_), Some(url)) => kube::Config::new(
                    url.parse()
                        .with_context(|| format!("--k8s-api-server {url}"))?,
                ),
                (Err(e), None) => return Err(e).context(
                    "no --kubeconfig, no $KUBECONFIG and not running in a pod (in-cluster config)",
                ),
            }
        };
    if let Some(url) = &config.api_server {
        kube_config.cluster_url = url
            .parse()
            .with_context(|| format!("--k8s-api-server {url}"))?;
    }
    Client::try_from(kube_config).context("building the API client")
}

/// One watcher event, or a watcher failure (it retries by itself).
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one event at a time through a channel: boxing buys nothing
pub enum WatchEvent {
    Service(Event<Service>),
    EndpointSlice(Event<EndpointSlice>),
    Node(Event<Node>),
    Failed(Kind, String),
}

/// Starts the three watchers; they run until the receiver is dropped.
pub fn spawn_watchers(
    client: Client,
    node_name: &str,
    tx: mpsc::Sender<WatchEvent>,
) -> Vec<JoinHandle<()>> {
    let proxyable = watcher::Config::default().labels(PROXYABLE);
    let own_node = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
    vec![
        spawn(
            Api::<Service>::all(client.clone()),
            proxyable.clone(),
            Kind::Service,
            WatchEvent::Service,
            tx.clone(),
        ),
        spawn(
            Api::<EndpointSlice>::all(client.clone()),
            proxyable,
            Kind::EndpointSlice,
            WatchEvent::EndpointSlice,
            tx.clone(),
        ),
        spawn(
            Api::<Node>::all(client),
            own_node,
            Kind::Node,
            WatchEvent::Node,
            tx,
        ),
    ]
}

fn spawn<K>(
    api: Api<K>,
    config: watcher::Config,
    kind: Kind,
    wrap: fn(Event<K>) -> WatchEvent,
    tx: mpsc::Sender<WatchEvent>,
) -> JoinHandle<()>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    tokio::spawn(async move {
        let mut stream = watcher::watcher(api, config).default_backoff().boxed();
        while let Some(item) = stream.next().await {
            let event = match item {
                Ok(event) => wrap(event),
                Err(e) => WatchEvent::Failed(kind, e.to_string()),
            };
            if tx.send(event).await.is_err() {
                return;
            }
        }
    })
}
