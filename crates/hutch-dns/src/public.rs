//! The public listener: authoritative for hutch's domain only, never a resolver.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use hickory_proto::op::{Message, OpCode, ResponseCode};
use hickory_proto::rr::rdata::SOA;
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

use crate::guest::response_to;
use crate::names::Labels;
use crate::server::{Handler, Step};
use crate::Directory;

/// TTL of the public A records and of the SOA.
pub(crate) const PUBLIC_TTL: u32 = 60;
/// SOA minimum: how long resolvers cache a negative answer.
const NEGATIVE_TTL: u32 = 30;

pub(crate) struct Public {
    pub(crate) domain: Labels,
    pub(crate) address: Ipv4Addr,
    pub(crate) dir: Arc<dyn Directory>,
    pub(crate) soa: Record,
}

impl Public {
    pub(crate) fn new(domain: Labels, address: Ipv4Addr, dir: Arc<dyn Directory>) -> Option<Self> {
        let mut apex = Name::from_labels(domain.0.iter().map(|l| l.as_bytes())).ok()?;
        apex.set_fqdn(true);
        let rname = apex.prepend_label("hostmaster").ok()?;
        let soa = SOA::new(apex.clone(), rname, 1, 3600, 600, 86400, NEGATIVE_TTL);
        let soa = Record::from_rdata(apex, PUBLIC_TTL, RData::SOA(soa));
        Some(Public {
            domain,
            address,
            dir,
            soa,
        })
    }
}

impl Handler for Public {
    fn handle(&self, _client: SocketAddr, query: Message) -> Step {
        let reply = |code| Step::Reply(response_to(&query, code));
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
        let apex = &self.soa.name;
        if !apex.zone_of(question.name()) {
            // Not ours: never resolved, never forwarded.
            return reply(ResponseCode::Refused);
        }
        if matches!(question.query_type(), RecordType::AXFR | RecordType::IXFR) {
            return reply(ResponseCode::Refused);
        }
        let (exists, address) = match Labels::of(question.name()) {
            Some(labels) => match labels.under(&self.domain) {
                Some([]) => (true, self.address),
                Some([.., label]) => (
                    self.dir.public_vm(label),
                    self.dir.public_address(label).unwrap_or(self.address),
                ),
                None => (false, self.address),
            },
            None => (false, self.address),
        };
        let mut resp = response_to(&query, ResponseCode::NoError);
        resp.metadata.authoritative = true;
        if !exists {
            resp.metadata.response_code = ResponseCode::NXDomain;
            resp.add_authority(self.soa.clone());
            return Step::Reply(resp);
        }
        match question.query_type() {
            RecordType::A | RecordType::ANY => {
                resp.add_answer(Record::from_rdata(
                    question.name().clone(),
                    PUBLIC_TTL,
                    RData::A(address.into()),
                ));
            }
            RecordType::SOA if question.name() == apex => {
                resp.add_answer(self.soa.clone());
            }
            _ => {
                resp.add_authority(self.soa.clone());
            }
        }
        Step::Reply(resp)
    }
}
