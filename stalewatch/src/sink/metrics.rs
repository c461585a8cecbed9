//! Prometheus/OpenMetrics metrics for `stalewatch watch --metrics ADDR`:
//! alerts by state and verdict, failing packets by cause, kernel reports,
//! wakeups and losses, map occupancy and evictions, and each eBPF program's run count
//! and run time. The exposition format comes from `prometheus-client`.

use std::sync::{Arc, Mutex};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};

use crate::{
    domain::{Alert, AlertState, Verdict},
    linux::icmp,
    source::kernel::{Counters, btf::DropReasons},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AlertLabels {
    state: String,
    verdict: String,
}

/// A raised flow's labels: the same for a stale flow (its stale backend)
/// and a dead destination (the dead address), so that a fleet's
/// Prometheus joins "A pins flows to X" with "B receives traffic for dead
/// X" on `backend`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FlowLabels {
    verdict: String,
    netns: String,
    /// `addr:port/proto` of a pinned flow's destination; empty for a dead
    /// destination (its service is on the host that sends it).
    service: String,
    backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabels {
    cause: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProgramLabels {
    program: String,
}

/// The metrics, updated by the watch loop and read by the HTTP server.
pub struct Metrics {
    registry: Registry,
    alerts: Family<AlertLabels, Counter>,
    failing_packets: Family<CauseLabels, Counter>,
    reports: Counter,
    wakeups: Counter,
    events_lost: Counter,
    map_entries: Family<MapLabels, Gauge>,
    map_evictions: Family<MapLabels, Counter>,
    program_runs: Family<ProgramLabels, Counter>,
    program_run_seconds: Family<ProgramLabels, Counter<f64>>,
    flows_tracked: Gauge,
    flows_raised: Gauge,
    raised_by_backend: Family<FlowLabels, Gauge>,
    /// The kernel's cumulative counters at the last refresh: counters move
    /// by the difference.
    last: Counters,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("stalewatch");
        let alerts = Family::<AlertLabels, Counter>::default();
        let failing_packets = Family::<CauseLabels, Counter>::default();
        let reports = Counter::default();
        let wakeups = Counter::default();
        let events_lost = Counter::default();
        let map_entries = Family::<MapLabels, Gauge>::default();
        let map_evictions = Family::<MapLabels, Counter>::default();
        let program_runs = Family::<ProgramLabels, Counter>::default();
        let program_run_seconds = Family::<ProgramLabels, Counter<f64>>::default();
        let flows_tracked = Gauge::default();
        let flows_raised = Gauge::default();
        let raised_by_backend = Family::<FlowLabels, Gauge>::default();
        registry.register(
            "alerts",
            "Alerts printed, by state and verdict",
            alerts.clone(),
        );
        registry.register(
            "failing_packets",
            "Packets the kernel failed to deliver, of DNATed flows or refused by this host, by cause",
            failing_packets.clone(),
        );
        registry.register("kernel_reports", "Reports the kernel sent", reports.clone());
        registry.register(
            "kernel_wakeups",
            "Kernel reports that woke stalewatch (the rest wait for its next look)",
            wakeups.clone(),
        );
        registry.register(
            "events_lost",
            "Reports the kernel could not hand over (ring buffer full)",
            events_lost.clone(),
        );
        registry.register(
            "map_entries",
            "Failing flows the kernel tracks now, by map",
            map_entries.clone(),
        );
        registry.register(
            "map_evictions",
            "Failing flows the kernel's LRU maps evicted, by map",
            map_evictions.clone(),
        );
        registry.register(
            "bpf_program_runs",
            "Runs of each eBPF program",
            program_runs.clone(),
        );
        registry.register(
            "bpf_program_run_seconds",
            "Time spent in each eBPF program",
            program_run_seconds.clone(),
        );
        registry.register(
            "flows_tracked",
            "Failing flows the correlator tracks",
            flows_tracked.clone(),
        );
        registry.register(
            "flows_raised",
            "Flows raised and not yet resolved",
            flows_raised.clone(),
        );
        registry.register(
            "raised_flows",
            "Flows raised and not yet resolved, by verdict, namespace, service and backend (the \
             stale backend, or the dead address)",
            raised_by_backend.clone(),
        );
        Metrics {
            raised_by_backend,
            registry,
            alerts,
            failing_packets,
            reports,
            wakeups,
            events_lost,
            map_entries,
            map_evictions,
            program_runs,
            program_run_seconds,
            flows_tracked,
            flows_raised,
            last: Counters::default(),
        }
    }

    pub fn alert(&self, state: AlertState, verdict: Verdict) {
        self.alerts
            .get_or_create(&AlertLabels {
                state: state.label().into(),
                verdict: verdict.label().into(),
            })
            .inc();
    }

    /// A flow raised (+1) or resolved (-1), by its labels.
    pub fn flow(&self, alert: &Alert, netns: &str) {
        let o = &alert.flow.orig;
        let service = if alert.verdict == Verdict::DeadDestination {
            String::new()
        } else {
            o.service().to_string()
        };
        let labels = FlowLabels {
            verdict: alert.verdict.label().into(),
            netns: netns.into(),
            service,
            backend: alert.flow.backend().addr.to_string(),
        };
        match alert.state {
            AlertState::Raised => {
                self.raised_by_backend.get_or_create(&labels).inc();
            }
            AlertState::Resolved => {
                let gauge = self.raised_by_backend.get_or_create(&labels);
                if gauge.get() > 0 {
                    gauge.dec();
                }
            }
            AlertState::Reminder => {}
        }
    }

    pub fn flows(&self, tracked: usize, raised: usize) {
        self.flows_tracked.set(tracked as i64);
        self.flows_raised.set(raised as i64);
    }

    /// Takes the kernel's cumulative counters.
    pub fn refresh(&mut self, now: &Counters, reasons: &DropReasons) {
        let delta = |new: u64, old: u64| new.saturating_sub(old);
        self.reports
            .inc_by(delta(now.stats.events_sent, self.last.stats.events_sent));
        self.wakeups
            .inc_by(delta(now.stats.wakeups, self.last.stats.wakeups));
        self.events_lost
            .inc_by(delta(now.stats.events_lost, self.last.stats.events_lost));
        for (slot, &count) in now.causes.iter().enumerate() {
            let old = self.last.causes.get(slot).copied().unwrap_or(0);
            if count > old {
                let cause = cause_name(slot as u32, reasons);
                self.failing_packets
                    .get_or_create(&CauseLabels { cause })
                    .inc_by(count - old);
            }
        }
        for (map, entries, inserted) in [
            ("flows", now.flows_entries, now.stats.flows_inserted),
            ("locals", now.locals_entries, now.stats.locals_inserted),
        ] {
            let labels = MapLabels { map: map.into() };
            self.map_entries.get_or_create(&labels).set(entries as i64);
            // Nothing is ever deleted from these maps: what was inserted
            // and is no longer there was evicted.
            let evicted = inserted.saturating_sub(entries);
            let counter = self.map_evictions.get_or_create(&labels);
            let before = counter.get();
            if evicted > before {
                counter.inc_by(evicted - before);
            }
        }
        for program in &now.programs {
            let labels = ProgramLabels {
                program: program.name.clone(),
            };
            let old = self
                .last
                .programs
                .iter()
                .find(|p| p.name == program.name)
                .cloned()
                .unwrap_or_default();
            self.program_runs
                .get_or_create(&labels)
                .inc_by(delta(program.runs, old.runs));
            let seconds = program.run_time.saturating_sub(old.run_time).as_secs_f64();
            self.program_run_seconds
                .get_or_create(&labels)
                .inc_by(seconds);
        }
        self.last = now.clone();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// A CAUSES slot's name: the drop reason, or `icmp_<what>`.
fn cause_name(slot: u32, reasons: &DropReasons) -> String {
    if slot < stalewatch_common::CAUSE_ICMP {
        return format!("drop_{}", reasons.name(slot).to_lowercase());
    }
    icmp::label((slot - stalewatch_common::CAUSE_ICMP) as u8)
}

/// Serves the metrics over HTTP: `GET /metrics` (any other path: 404).
/// Connections are handled one at a time, which is plenty for a scraper.
pub async fn serve(listener: TcpListener, metrics: Arc<Mutex<Metrics>>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let mut request = Vec::with_capacity(1024);
        let mut buf = [0u8; 1024];
        // Read the request head, bounded in size and time.
        let head = tokio::time::timeout(std::time::Duration::from_secs(2), async {
            while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        if head.is_err() {
            continue;
        }
        let line = String::from_utf8_lossy(&request);
        let response = if line.starts_with("GET /metrics ") || line.starts_with("GET /metrics?") {
            let body = metrics.lock().map(|m| m.encode()).unwrap_or_default();
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
        } else {
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_owned()
        };
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
    }
}
