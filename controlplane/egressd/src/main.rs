//! egressd: node-level egress firewall daemon.
#![forbid(unsafe_code)]

mod access;
mod adoption;
mod cgroups;
mod clients;
mod control;
mod engine;
mod events;
mod ids;
mod limits;
mod metrics;
mod modes;
mod ratelimit;
mod recorder;

use std::io::IsTerminal as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser as _;
use futures_util::StreamExt as _;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

use egressd::cli::Args;

use crate::control::Shared;
use crate::engine::Engine;
use crate::events::EventHub;

#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// How often cgroups matching workload patterns are looked for again (new services, pods).
const CGROUP_RESCAN: Duration = Duration::from_secs(2);
const EVENT_BATCH: usize = 1024;
/// DNS answers learned per hold of the daemon's lock (a few milliseconds' work).
const ANSWERS_PER_LOCK: usize = 128;
/// How often learned addresses are checked for expiry.
const DNS_EXPIRY_TICK: Duration = Duration::from_millis(500);

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("EGRESSD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout);
    if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init();
    } else {
        builder.init();
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let json = !std::io::stdout().is_terminal();
    init_logging(json);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!("starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args, json)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("egressd failed: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args, json: bool) -> anyhow::Result<()> {
    if args.uninstall {
        let removed = egressd_datapath::uninstall(&args.pin_dir)
            .with_context(|| format!("removing the pins in {}", args.pin_dir.display()))?;
        if removed {
            tracing::info!(pin_dir = %args.pin_dir.display(), "pins removed: programs detach once no egressd holds them");
        } else {
            tracing::info!(pin_dir = %args.pin_dir.display(), "nothing pinned");
        }
        return Ok(());
    }
    // Everything that can be wrong with the input is checked before touching the kernel.
    let policy =
        egressd_policy::load(&args.config).map_err(|e| anyhow::anyhow!(engine::error_chain(&e)))?;
    let read_group = access::resolve_read_group(&policy)
        .map_err(|e| anyhow::anyhow!(engine::error_chain(&e)))?;
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating state directory {}", args.state_dir.display()))?;
    let modes = modes::ModeOverrides::load(&args.state_dir)?;
    let cgroup_root = match args.cgroup_root {
        Some(root) => root,
        None => egressd_datapath::cgroup2_mount()?,
    };
    let socket_group = args.socket_group.as_deref().map(group_id).transpose()?;
    let listener = control::bind(&args.socket, socket_group)?;
    let access = access::Access::new(&args.socket, socket_group);
    access.set_read_group(read_group);

    let mut capacities = egressd_datapath::MapCapacities::default();
    for spec in &args.test_map_capacity {
        capacities.lower_from_spec(spec)?;
    }
    if !capacities.is_empty() {
        tracing::warn!(
            capacities = ?args.test_map_capacity,
            "--test-map-capacity: maps created smaller than usual (for tests)"
        );
    }
    // The programs load (about half a second of the verifier's CPU) while the engine fills the
    // maps; they are attached once both are done.
    let mut datapath =
        egressd_datapath::Datapath::begin_load(&cgroup_root, Some(&args.pin_dir), &capacities)
            .with_context(|| format!("loading the eBPF datapath at {}", cgroup_root.display()))?;
    let events = datapath.take_events()?;
    let dns_answers = datapath.take_dns_answers()?;
    let observe_settings = policy.observe.clone();
    let mut engine = Engine::new(
        datapath,
        policy,
        modes,
        args.config.clone(),
        &args.state_dir,
    )?;
    engine
        .attach()
        .with_context(|| format!("loading the eBPF datapath at {}", cgroup_root.display()))?;
    if let Some(kernel_log) = engine.take_kernel_log() {
        tokio::spawn(kernel_log.run());
    }
    // Our programs are attached and our policy is in the maps: the previous daemon's programs
    // (if its pins were adopted) can go.
    match engine.retire_previous() {
        Ok(0) => {}
        Ok(retired) => tracing::info!(retired, "detached the previous egressd's programs"),
        Err(e) => tracing::error!("detaching the previous egressd's programs: {e:#}"),
    }
    let (recorder, unstarted_recorder) = recorder::create(&args.state_dir, observe_settings);
    let shared = Arc::new(Shared {
        engine: Mutex::new(engine),
        events: EventHub::new(json),
        access,
        reload_serial: tokio::sync::Mutex::new(()),
        recorder: recorder.clone(),
        rings: control::RingSync::default(),
    });
    let recorder_thread = unstarted_recorder.start(shared.clone())?;

    // One task reads both rings: DNS answers are learned before the events that follow them
    // are labelled (the kernel hands over an answer before its socket sees it, so before any
    // connect that uses it), and learned addresses expire on time.
    tokio::spawn(kernel_records(shared.clone(), events, dns_answers));

    let rescan_shared = shared.clone();
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(CGROUP_RESCAN);
        loop {
            ticker.tick().await;
            if let Ok(mut engine) = rescan_shared.engine.lock()
                && let Err(e) = engine.rescan_cgroups()
            {
                tracing::error!("updating workload cgroups: {e:#}");
            }
        }
    });

    tokio::spawn(control::serve(
        listener,
        shared.clone(),
        args.socket.clone(),
    ));
    let metrics = match shared.engine.lock() {
        Ok(engine) => engine.metrics_settings().clone(),
        Err(_) => anyhow::bail!("daemon state is poisoned"),
    };
    if metrics.enabled {
        tokio::spawn(metrics::serve(metrics.listen, shared.clone()));
    }
    tracing::info!(
        cgroup_root = %cgroup_root.display(),
        socket = %args.socket.display(),
        config = %args.config.display(),
        "egressd ready"
    );
    // systemd (Type=notify): programs are attached and the policy is in force.
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!("telling systemd we are ready: {e}");
    }

    let mut signals = signal_hook_tokio::Signals::new([SIGHUP, SIGTERM, SIGINT])
        .context("installing signal handlers")?;
    while let Some(signal) = signals.next().await {
        match signal {
            SIGHUP => {
                // The outcome is logged and shown by `egressctl status`.
                let _ = control::reload(&shared).await;
            }
            _ => {
                tracing::info!("signal {signal}: stopping");
                break;
            }
        }
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    // What the kernel summarised since the last flush is written before leaving.
    recorder::stop(&recorder, recorder_thread);
    let _ = std::fs::remove_file(&args.socket);
    let on_stop = shared
        .engine
        .lock()
        .map(|engine| engine.on_stop())
        .unwrap_or_default();
    match on_stop {
        egressd_policy::OnStop::Keep => tracing::info!(
            pin_dir = %args.pin_dir.display(),
            "programs stay pinned and keep enforcing until the next egressd adopts them \
             (`egressd --uninstall` removes them)"
        ),
        egressd_policy::OnStop::Detach => {
            // Our own links close with this process: removing the pins is all it takes.
            egressd_datapath::uninstall(&args.pin_dir)?;
            tracing::info!(
                "pins removed (on_stop = \"detach\"): programs detach as egressd exits and \
                 nothing is enforced"
            );
        }
    }
    Ok(())
}

/// A group name (looked up in the system's group database) or number.
fn group_id(group: &str) -> anyhow::Result<u32> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(group) {
        Ok(Some(found)) => Ok(found.gid.as_raw()),
        Ok(None) => anyhow::bail!("--socket-group {group}: no such group"),
        Err(e) => anyhow::bail!("--socket-group {group}: looking it up failed: {e}"),
    }
}

/// What an event tells the observation recorder: a destination exists (in case its kernel
/// summary is evicted before a flush reads it).
fn sighting(
    event: &egressd_datapath::Event,
    workload: &str,
    address: std::net::IpAddr,
    dns_name: Option<String>,
) -> recorder::Sighting {
    let port = matches!(event.protocol, 6 | 17)
        .then_some(event.destination_port)
        .flatten();
    recorder::Sighting {
        key: egressd_observe::FlowKey::new(workload, address, port, event.protocol),
        at: event.time,
        verdict: match event.verdict {
            egressd_datapath::Verdict::Allow => egressd_observe::SampleVerdict::Allowed,
            egressd_datapath::Verdict::Deny => egressd_observe::SampleVerdict::Denied,
            egressd_datapath::Verdict::WouldDeny => egressd_observe::SampleVerdict::WouldDeny,
        },
        dns_name,
        process: Some(egressd_observe::Process::new(event.comm.clone(), None)),
    }
}

/// Reads verdict events and DNS answers from the kernel until a ring buffer fails.
async fn kernel_records(
    shared: Arc<Shared>,
    mut events: egressd_datapath::EventStream,
    mut dns_answers: egressd_datapath::DnsAnswerStream,
) {
    let mut event_batch = Vec::with_capacity(EVENT_BATCH);
    let mut answer_batch = Vec::with_capacity(EVENT_BATCH);
    let mut expiry = tokio::time::interval(DNS_EXPIRY_TICK);
    loop {
        // While the kernel refuses connections in a tight loop the rings are never empty, so
        // nothing below waits: without this the task would keep its worker thread forever,
        // and the control socket, metrics and signals would get no answer. It yields once its
        // budget is spent, not every time: under a steady trickle of DNS answers this loop
        // runs thousands of times a second, and each `yield_now` cost a poll of the I/O
        // driver (a system call) and a wakeup.
        tokio::task::consume_budget().await;
        event_batch.clear();
        answer_batch.clear();
        let mut expire = false;
        tokio::select! {
            result = events.next_batch(&mut event_batch, EVENT_BATCH) => match result {
                Ok(0) => {}
                Ok(undecodable) => tracing::warn!("{undecodable} event records could not be decoded"),
                Err(e) => {
                    tracing::error!("event ring buffer: {e}");
                    return;
                }
            },
            result = dns_answers.next_batch(&mut answer_batch, EVENT_BATCH) => {
                if let Err(e) = result {
                    tracing::error!("DNS answer ring buffer: {e}");
                    return;
                }
            }
            _ = expiry.tick() => expire = true,
            () = shared.rings.requested() => {}
        }
        let serving = shared.rings.serving();
        // Whatever woke us, answers already in the ring are learned first. They are parsed
        // here, without the daemon's lock, and learned a bounded number per lock: a workload
        // flooding its resolver fills the ring with thousands, and learning them all at once
        // held the lock (and kept `egressctl status` waiting) for a quarter of a second.
        dns_answers.drain(&mut answer_batch, usize::MAX);
        let mut parsed = answer_batch
            .iter()
            .map(|answer| egressd_dns::parse_response(&answer.payload))
            .collect::<Vec<_>>()
            .into_iter();
        let mut questions = Vec::new();
        let mut refusals = Vec::new();
        for answers in answer_batch.chunks(ANSWERS_PER_LOCK) {
            {
                let Ok(mut engine) = shared.engine.lock() else {
                    tracing::error!("daemon state is poisoned; stopping event processing");
                    return;
                };
                for (answer, response) in answers.iter().zip(parsed.by_ref()) {
                    match engine.refused_query_event(answer) {
                        Some(record) => refusals.push(record),
                        None => questions.extend(engine.observe_answer(answer, response)),
                    }
                }
            }
            tokio::task::consume_budget().await;
        }
        let Ok(mut engine) = shared.engine.lock() else {
            tracing::error!("daemon state is poisoned; stopping event processing");
            return;
        };
        if expire {
            engine.expire_addresses();
        }
        shared.rings.served(serving);
        let records: Vec<_> = event_batch
            .iter()
            .map(|event| {
                let dns_name = event
                    .destination
                    .and_then(|addr| engine.dns_name_for(event.workload, addr));
                let workload = engine.workload_name(event.workload);
                let sighting = match (&workload, event.destination) {
                    (Some(name), Some(address)) => {
                        Some(sighting(event, name, address, dns_name.clone()))
                    }
                    _ => None,
                };
                (events::record(event, workload, dns_name), sighting)
            })
            .collect();
        drop(engine);
        shared.recorder.questions(questions);
        // Refused DNS questions go through the same rate limit (each name its own
        // destination there); they have no sighting.
        for record in refusals {
            shared.events.offer(record);
        }
        for (record, sighting) in records {
            // A refusal the rate limit holds back is not recorded either: the first of its
            // destination was, and the kernel's summary counts every one.
            if shared.events.offer(record)
                && let Some(sighting) = sighting
            {
                shared.recorder.sighting(sighting);
            }
        }
        if expire {
            shared.events.flush_held();
        }
    }
}
