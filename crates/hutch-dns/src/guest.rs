//! The guest resolver: VM names from the [`Directory`], every other name forwarded upstream when
//! the client's egress rules allow it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};
use tokio::sync::Semaphore;

use crate::names::Labels;
use crate::server::{Handler, Step, MAX_UDP};
use crate::upstream;
use crate::Directory;

/// TTL of VM address answers: short, a VM can be deleted and its name reused.
pub(crate) const VM_TTL: u32 = 10;

pub(crate) struct Guest {
    pub(crate) domain: Labels,
    pub(crate) dir: Arc<dyn Directory>,
    pub(crate) upstreams: Arc<[SocketAddr]>,
    pub(crate) in_flight: Arc<Semaphore>,
    pub(crate) per_server: Duration,
}

/// A response to `query` with its header flags, question and (when the query had one) an OPT
/// record; no records.
pub(crate) fn response_to(query: &Message, code: ResponseCode) -> Message {
    let mut resp = Message::response(query.metadata.id, query.metadata.op_code);
    resp.metadata.recursion_desired = query.metadata.recursion_desired;
    resp.metadata.checking_disabled = query.metadata.checking_disabled;
    resp.metadata.response_code = code;
    resp.queries = query.queries.clone();
    if query.edns.is_some() {
        resp.set_edns(our_edns());
    }
    resp
}

fn our_edns() -> Edns {
    let mut edns = Edns::new();
    edns.set_max_payload(MAX_UDP as u16);
    edns
}

/// The client as an IPv4 address (IPv4-mapped IPv6 included).
fn client_v4(client: SocketAddr) -> Option<Ipv4Addr> {
    match client.ip() {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(a) => a.to_ipv4_mapped(),
    }
}

impl Handler for Guest {
    fn handle(&self, client: SocketAddr, query: Message) -> Step {
        let reply = |code| Step::Reply(response_to(&query, code));
        let Some(client_ip) = client_v4(client) else {
            return reply(ResponseCode::Refused);
        };
        if query.metadata.op_code != OpCode::Query {
            return reply(ResponseCode::NotImp);
        }
        if query.queries.len() != 1 {
            return reply(ResponseCode::FormErr);
        }
        let question = &query.queries[0];
        if question.query_class() != DNSClass::IN {
            return reply(ResponseCode::Refused);
        }
        let Some(labels) = Labels::of(question.name()) else {
            return reply(ResponseCode::Refused);
        };

        // Hutch's names: a single label, or anything under the domain.
        let vm = if labels.len() == 1 {
            Some(labels.0[0].as_str())
        } else {
            match labels.under(&self.domain) {
                Some([]) => return reply(ResponseCode::NoError),
                Some([vm]) => Some(vm.as_str()),
                Some(_) => return reply(ResponseCode::NXDomain),
                None => None,
            }
        };
        if let Some(vm) = vm {
            let Some(addr) = self.dir.vm_address(client_ip, vm) else {
                return reply(ResponseCode::NXDomain);
            };
            let mut resp = response_to(&query, ResponseCode::NoError);
            resp.metadata.authoritative = true;
            resp.metadata.recursion_available = true;
            if matches!(question.query_type(), RecordType::A | RecordType::ANY) {
                resp.add_answer(Record::from_rdata(
                    question.name().clone(),
                    VM_TTL,
                    RData::A(addr.into()),
                ));
            }
            return Step::Reply(resp);
        }

        if labels.len() == 0 || matches!(question.query_type(), RecordType::AXFR | RecordType::IXFR)
        {
            return reply(ResponseCode::Refused);
        }
        let fqdn = labels.dotted();
        if !self.dir.may_resolve(client_ip, &fqdn) {
            tracing::debug!(client = %client_ip, %fqdn, "dns: name refused by the egress rules");
            return reply(ResponseCode::Refused);
        }
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            tracing::debug!(client = %client_ip, "dns: too many upstream queries in flight");
            return reply(ResponseCode::ServFail);
        };

        let dir = self.dir.clone();
        let upstreams = self.upstreams.clone();
        let per_server = self.per_server;
        Step::Later(Box::pin(async move {
            let _permit = permit;
            let question = &query.queries[0];
            let dnssec_ok = query.edns.as_ref().is_some_and(|e| e.flags().dnssec_ok);
            let answer = upstream::ask(
                &upstreams,
                question,
                dnssec_ok,
                query.metadata.checking_disabled,
                per_server,
            )
            .await;
            let Some(answer) = answer else {
                return Some(response_to(&query, ResponseCode::ServFail));
            };
            let (addrs, ttl) = upstream::addresses(&answer, question.name());
            if !addrs.is_empty() {
                dir.resolved(client_ip, &fqdn, &addrs, ttl);
            }
            Some(relay(&query, answer))
        }))
    }
}

/// The upstream's `answer` as the answer to the client's `query`: the client's id, flags and
/// question (with its letter case), our OPT record or none, no signature.
fn relay(query: &Message, answer: Message) -> Message {
    let code = answer.metadata.response_code;
    if query.edns.is_none() && code.high() != 0 {
        // An extended code cannot be told to a client without EDNS.
        return response_to(query, ResponseCode::ServFail);
    }
    let mut resp = response_to(query, code);
    resp.metadata.authoritative = answer.metadata.authoritative;
    resp.metadata.recursion_available = true;
    resp.metadata.authentic_data = answer.metadata.authentic_data;
    resp.answers = answer.answers;
    resp.authorities = answer.authorities;
    resp.additionals = answer.additionals;
    resp
}
