//! End to end: `watch --metrics` serves OpenMetrics text that a real HTTP
//! client (curl) scrapes, with the counters of a real stale flow in it.

use std::{process::Command, time::Duration};

use stalewatch_tests::{
    story::{Rules, Story, Variant},
    traffic::{Producer, Receiver},
    watcher::{Watcher, is_stale_flow},
};

fn scrape(url: &str) -> (String, String) {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "5",
            "-w",
            "\n%{http_code} %{content_type}",
            url,
        ])
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or((&text, ""));
    (body.to_owned(), status.to_owned())
}

/// The value of the sample named `name` (with its labels), if present.
fn sample(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn metrics_count_a_stale_flow() -> anyhow::Result<()> {
    let mut story = Story::build(Variant::v4(Rules::Iptables))?;
    let old = Receiver::start(story.old.as_ref().expect("old"), 8888)?;
    // Loopback of the root namespace: metrics stay on this machine.
    let port = 20_000 + std::process::id() % 10_000;
    let addr = format!("127.0.0.1:{port}");
    let watcher = Watcher::start(&["--netns", &story.router.name, "--metrics", &addr])?;
    let url = format!("http://{addr}/metrics");
    let (body, status) = scrape(&url);
    assert!(
        status.starts_with("200 application/openmetrics-text"),
        "{status}"
    );
    assert_eq!(
        sample(&body, "stalewatch_flows_raised"),
        Some(0.0),
        "{body}"
    );
    assert!(
        body.trim_end().ends_with("# EOF"),
        "OpenMetrics ends with # EOF"
    );

    let src = story.producer_addr(40000);
    let mut stream = Producer::start(
        &story.producer,
        src,
        story.service(),
        Duration::from_millis(100),
        600,
        Duration::from_secs(60),
    )?;
    assert!(old.wait_from(src, 5, Duration::from_secs(10)));
    story.redeploy()?;
    drop(old);
    watcher
        .wait_for(Duration::from_secs(20), |v| {
            is_stale_flow(v, "raised", 40000)
        })
        .expect("raised");
    // Alerts are counted at once, the kernel's counters every 5 s: poll
    // until both show.
    let raised = r#"stalewatch_alerts_total{state="raised",verdict="stale"}"#;
    let body = stalewatch_tests::poll(Duration::from_secs(15), || {
        let (body, _) = scrape(&url);
        (sample(&body, raised) == Some(1.0)
            && sample(&body, "stalewatch_kernel_wakeups_total") >= Some(1.0))
        .then_some(body)
    })
    .unwrap_or_else(|| panic!("the raised alert is never counted: {}", scrape(&url).0));
    assert!(
        sample(
            &body,
            r#"stalewatch_failing_packets_total{cause="drop_neigh_failed"}"#
        ) >= Some(3.0),
        "{body}"
    );
    assert!(
        sample(
            &body,
            r#"stalewatch_failing_packets_total{cause="icmp_host_unreachable"}"#
        ) >= Some(1.0),
        "{body}"
    );
    assert!(
        sample(&body, "stalewatch_kernel_reports_total") >= Some(1.0),
        "{body}"
    );
    // The report that raised the flow woke stalewatch; most others did not.
    let wakeups = sample(&body, "stalewatch_kernel_wakeups_total");
    assert!(
        wakeups >= Some(1.0) && wakeups <= sample(&body, "stalewatch_kernel_reports_total"),
        "{body}"
    );
    assert_eq!(
        sample(&body, "stalewatch_events_lost_total"),
        Some(0.0),
        "{body}"
    );
    assert_eq!(
        sample(&body, "stalewatch_flows_raised"),
        Some(1.0),
        "{body}"
    );
    // The labels packaging/prometheus's alerts read.
    let by_backend = format!(
        r#"stalewatch_raised_flows{{verdict="stale",netns="{}",service="192.0.2.1:8888/udp",backend="172.17.0.2"}}"#,
        story.router.name
    );
    assert_eq!(sample(&body, &by_backend), Some(1.0), "{body}");
    assert!(
        sample(&body, r#"stalewatch_map_entries{map="flows"}"#) >= Some(1.0),
        "{body}"
    );
    assert!(
        sample(
            &body,
            r#"stalewatch_bpf_program_runs_total{program="kfree_skb"}"#
        ) >= Some(1.0),
        "{body}"
    );
    assert!(
        sample(
            &body,
            r#"stalewatch_bpf_program_run_seconds_total{program="kfree_skb"}"#
        ) > Some(0.0),
        "{body}"
    );
    let (_, status) = scrape(&format!("http://{addr}/other"));
    assert!(status.starts_with("404"), "{status}");
    stream.stop();
    let (status, _) = watcher.stop()?;
    assert!(status.success());
    Ok(())
}

#[test]
fn metrics_address_in_use_is_one_clear_line() -> anyhow::Result<()> {
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = taken.local_addr()?.to_string();
    let out = Command::new(stalewatch_tests::watcher::binary())
        .args(["watch", "--metrics", &addr])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!("cannot serve metrics on {addr}")),
        "{stderr}"
    );
    Ok(())
}
