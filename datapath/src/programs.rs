//! Loading the programs into the kernel and attaching them at the cgroup root.
//!
//! The verifier walks every path of each program inside the `BPF_PROG_LOAD` syscall of the
//! thread that makes it: about half a second of CPU for all of them on Linux 6.18 (the long
//! loops are bpf_loop walks for that reason, see the eBPF crate's `loops`). Privileged loads do
//! not wait for each other in the kernel, so the programs are loaded largest first on every
//! core but one, on a thread of their own that leaves the caller free to fill the maps
//! meanwhile ([`Verification`]). Nothing is attached until every program is loaded
//! ([`attach_all`]).

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::thread::JoinHandle;

use aya::{
    Ebpf,
    maps::ProgramArray,
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr, Program,
        ProgramError, links::FdLink,
    },
};

use crate::{DatapathError, kernel, map_err, program_err};

const SOCK_ADDR_PROGRAMS: [&str; 4] = ["connect4", "connect6", "sendmsg4", "sendmsg6"];

/// The program egress tail-calls for DNS questions; loaded, never attached.
const DNS_QUERY: &str = "dns_query";

/// The programs to attach, in order, and where.
pub(crate) type AttachPlan = Vec<(&'static str, AttachPoint)>;

/// Where a program attaches at the cgroup root.
#[derive(Debug, Clone, Copy)]
pub(crate) enum AttachPoint {
    SockAddr,
    Sock,
    Skb(CgroupSkbAttachType),
}

/// What a job loads.
#[derive(Debug, Clone, Copy)]
enum Job {
    /// `egress`, or `egress_compat` where the kernel refuses it.
    Egress,
    One(&'static str, AttachPoint),
}

/// Every program, by the verifier's work on it, largest first (instructions verified on Linux
/// 6.18: egress 159k, connect4 121k, sendmsg4 and sendmsg6 77k each, connect6 65k, ingress
/// 56k, dns_query 25k, sock_create 2k; the verifier spends about a microsecond on each): each
/// free thread takes the next, so the threads finish close together.
const JOBS: [Job; 8] = [
    Job::Egress,
    Job::One(SOCK_ADDR_PROGRAMS[0], AttachPoint::SockAddr),
    Job::One(SOCK_ADDR_PROGRAMS[2], AttachPoint::SockAddr),
    Job::One(SOCK_ADDR_PROGRAMS[3], AttachPoint::SockAddr),
    Job::One(SOCK_ADDR_PROGRAMS[1], AttachPoint::SockAddr),
    Job::One("ingress", AttachPoint::Skb(CgroupSkbAttachType::Ingress)),
    Job::One(DNS_QUERY, AttachPoint::Skb(CgroupSkbAttachType::Egress)),
    Job::One("sock_create", AttachPoint::Sock),
];

/// The object with every program loaded (none attached), and what to attach.
pub(crate) struct Verified {
    pub(crate) ebpf: Ebpf,
    pub(crate) plan: AttachPlan,
    /// Whether the egress program that names sending tasks was accepted (else its twin).
    pub(crate) sender_tasks: bool,
}

/// The programs of an object being loaded on threads of their own.
pub(crate) struct Verification {
    thread: JoinHandle<Result<Verified, DatapathError>>,
}

impl Verification {
    /// Starts loading every program of `ebpf` (whose maps exist already) and putting
    /// dns_query in egress's program array.
    pub(crate) fn start(mut ebpf: Ebpf) -> Result<Verification, DatapathError> {
        let thread = std::thread::Builder::new()
            .name("ebpf-load".to_owned())
            .spawn(move || {
                let (plan, sender_tasks) = load_all(&mut ebpf)?;
                install_dns_query_program(&mut ebpf)?;
                Ok(Verified {
                    ebpf,
                    plan,
                    sender_tasks,
                })
            })
            .map_err(|source| DatapathError::Io {
                what: "starting the thread that loads the eBPF programs",
                source,
            })?;
        Ok(Verification { thread })
    }

    /// Waits until every program is loaded, or one failed.
    pub(crate) fn wait(self) -> Result<Verified, DatapathError> {
        self.thread
            .join()
            .unwrap_or(Err(DatapathError::LoaderPanicked))
    }
}

/// A refusal by the verifier as the rule the program broke on this kernel (the full log goes
/// to the debug log); any other failure as it is.
fn load_err(name: &'static str, error: ProgramError) -> DatapathError {
    match error {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            log::debug!("the verifier's output for eBPF program {name}:\n{log}");
            DatapathError::ProgramRefused {
                name,
                kernel: kernel::release(),
                reason: kernel::verifier_reason(&log).unwrap_or_else(|| {
                    format!("the BPF_PROG_LOAD syscall failed ({io_error}) without a reason")
                }),
            }
        }
        other => program_err(name, "loading")(other),
    }
}

/// Loads `program` as the type that attaches at `point` (aya's program types share no trait
/// for `load`).
fn load_one(
    name: &'static str,
    point: AttachPoint,
    program: &mut Program,
) -> Result<(), DatapathError> {
    let loaded = match point {
        AttachPoint::SockAddr => <&mut CgroupSockAddr>::try_from(program)
            .map_err(program_err(name, "type check"))?
            .load(),
        AttachPoint::Sock => <&mut CgroupSock>::try_from(program)
            .map_err(program_err(name, "type check"))?
            .load(),
        AttachPoint::Skb(_) => <&mut CgroupSkb>::try_from(program)
            .map_err(program_err(name, "type check"))?
            .load(),
    };
    loaded.map_err(|e| load_err(name, e))
}

/// Loads egress, or egress_compat where the kernel cannot name the current task in cgroup_skb
/// programs or refuses egress. Returns whether egress was loaded.
fn load_egress(egress: &mut Program, compat: &mut Program) -> Result<bool, DatapathError> {
    let point = AttachPoint::Skb(CgroupSkbAttachType::Egress);
    // Probed first: a refused load of the whole program would cost a full verifier run, and
    // kernels before 6.10 refuse bpf_get_current_pid_tgid in cgroup_skb programs.
    if kernel::cgroup_skb_knows_current_task() {
        match load_one("egress", point, egress) {
            Ok(()) => return Ok(true),
            Err(e) => {
                log::info!("egress program with sending tasks refused ({e}); using egress_compat");
            }
        }
    } else {
        log::info!(
            "cgroup_skb programs cannot name the current task on this kernel (Linux 6.10 can): \
             using egress_compat, flows name their connecting task only"
        );
    }
    load_one("egress_compat", point, compat)?;
    Ok(false)
}

/// A job with the programs it loads.
enum Work<'a> {
    Egress {
        egress: &'a mut Program,
        compat: &'a mut Program,
    },
    One(&'static str, AttachPoint, &'a mut Program),
}

/// What a job did: `Some(sender_tasks)` for egress, `None` for the others.
type JobResult = Result<Option<bool>, DatapathError>;

/// Loads every program into the kernel, attaching nothing: a program the verifier refuses
/// stops egressd before anything is attached. Returns the programs to attach and whether
/// the egress program that names sending tasks was accepted (else its compatible twin).
fn load_all(ebpf: &mut Ebpf) -> Result<(AttachPlan, bool), DatapathError> {
    let mut programs: BTreeMap<&str, &mut Program> = ebpf.programs_mut().collect();
    let mut take = |name: &'static str| {
        programs
            .remove(name)
            .ok_or(DatapathError::MissingProgram { name })
    };
    let mut queue = VecDeque::with_capacity(JOBS.len());
    for (index, job) in JOBS.into_iter().enumerate() {
        let work = match job {
            Job::Egress => Work::Egress {
                egress: take("egress")?,
                compat: take("egress_compat")?,
            },
            Job::One(name, point) => Work::One(name, point, take(name)?),
        };
        queue.push_back((index, work));
    }
    // One core is left to the caller, which fills the maps meanwhile: with 100,000 rules that
    // takes longer than verifying every program, so it is what start-up waits for.
    let threads = std::thread::available_parallelism()
        .map_or(1, NonZeroUsize::get)
        .saturating_sub(1)
        .clamp(1, JOBS.len());
    let queue = Mutex::new(queue);
    let results: Mutex<Vec<Option<JobResult>>> =
        Mutex::new((0..JOBS.len()).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let next = queue.lock().ok().and_then(|mut queue| queue.pop_front());
                    let Some((index, work)) = next else {
                        return;
                    };
                    let result = match work {
                        Work::Egress { egress, compat } => load_egress(egress, compat).map(Some),
                        Work::One(name, point, program) => {
                            load_one(name, point, program).map(|()| None)
                        }
                    };
                    if let Ok(mut results) = results.lock()
                        && let Some(slot) = results.get_mut(index)
                    {
                        *slot = Some(result);
                    }
                }
            });
        }
    });
    let results = results
        .into_inner()
        .map_err(|_| DatapathError::LoaderPanicked)?;
    let mut sender_tasks = false;
    for result in results {
        // A job without a result: its thread panicked.
        if let Some(tasks) = result.ok_or(DatapathError::LoaderPanicked)?? {
            sender_tasks = tasks;
        }
    }
    let mut plan: AttachPlan = SOCK_ADDR_PROGRAMS
        .iter()
        .map(|&name| (name, AttachPoint::SockAddr))
        .collect();
    plan.push(("sock_create", AttachPoint::Sock));
    let egress = if sender_tasks {
        "egress"
    } else {
        "egress_compat"
    };
    plan.push((egress, AttachPoint::Skb(CgroupSkbAttachType::Egress)));
    plan.push(("ingress", AttachPoint::Skb(CgroupSkbAttachType::Ingress)));
    Ok((plan, sender_tasks))
}

/// The program `$name` as a `$ty`, attached with `$attach`, its link owned by the caller.
macro_rules! attach_owned {
    ($ebpf:expr, $ty:ty, $name:expr, |$program:ident| $attach:expr) => {{
        let name: &'static str = $name;
        let $program: &mut $ty = $ebpf
            .program_mut(name)
            .ok_or(DatapathError::MissingProgram { name })?
            .try_into()
            .map_err(program_err(name, "type check"))?;
        let id = $attach.map_err(program_err(name, "attaching"))?;
        let link = $program
            .take_link(id)
            .map_err(program_err(name, "taking its link"))?;
        FdLink::try_from(link).map_err(|source| DatapathError::Link {
            name,
            source: Box::new(source),
        })?
    }};
}

/// Attaches every loaded program at `cgroup` as a bpf_link the caller owns: dropping an
/// unpinned link detaches it, so a failure part-way leaves nothing attached.
pub(crate) fn attach_all(
    ebpf: &mut Ebpf,
    cgroup: &File,
    plan: &[(&'static str, AttachPoint)],
) -> Result<Vec<(&'static str, String, FdLink)>, DatapathError> {
    // bpf_link attachments coexist with other programs on the same cgroup (the kernel attaches
    // links in multi mode); `Single` is aya's name for "no flags".
    let mode = CgroupAttachMode::Single;
    let mut links = Vec::with_capacity(plan.len());
    for &(name, point) in plan {
        let (link, description) = match point {
            AttachPoint::SockAddr => (
                attach_owned!(ebpf, CgroupSockAddr, name, |p| p.attach(cgroup, mode)),
                format!("{name} (cgroup/{name})"),
            ),
            AttachPoint::Sock => (
                attach_owned!(ebpf, CgroupSock, name, |p| p.attach(cgroup, mode)),
                format!("{name} (cgroup/{name})"),
            ),
            AttachPoint::Skb(attach_type) => (
                attach_owned!(ebpf, CgroupSkb, name, |p| p.attach(
                    cgroup,
                    attach_type,
                    mode
                )),
                format!("{name} (cgroup_skb/{})", attach_type_name(attach_type)),
            ),
        };
        links.push((name, description, link));
    }
    Ok(links)
}

fn attach_type_name(attach_type: CgroupSkbAttachType) -> &'static str {
    match attach_type {
        CgroupSkbAttachType::Egress => "egress",
        CgroupSkbAttachType::Ingress => "ingress",
    }
}

/// Puts the loaded `dns_query` (reached by tail call from egress for workloads whose DNS
/// questions must name something their FQDN rules allow) in egress's program array. Done
/// before egress is attached: until then egress refuses such questions (fail closed).
fn install_dns_query_program(ebpf: &mut Ebpf) -> Result<(), DatapathError> {
    let name = DNS_QUERY;
    let fd = ebpf
        .program(name)
        .ok_or(DatapathError::MissingProgram { name })?
        .fd()
        .map_err(program_err(name, "getting its fd"))?
        .try_clone()
        .map_err(|source| DatapathError::Io {
            what: "duplicating the dns_query program fd",
            source,
        })?;
    let map = ebpf
        .map_mut("DNS_QUERY_PROGRAM")
        .ok_or(DatapathError::MissingMap {
            name: "DNS_QUERY_PROGRAM",
        })?;
    let mut programs =
        ProgramArray::try_from(map).map_err(map_err("DNS_QUERY_PROGRAM", "opening"))?;
    programs
        .set(0, &fd, 0)
        .map_err(map_err("DNS_QUERY_PROGRAM", "writing"))?;
    Ok(())
}
