//! Test helpers: a tiny DNS client over UDP/TCP, and a fake upstream resolver built on
//! hickory-server. Loopback only.

#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Edns, Message, Metadata, Query, ResponseCode};
use hickory_server::proto::rr::rdata::A;
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use hickory_server::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// The answer of the fake upstream for `example.test`.
pub const EXAMPLE_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
/// How many A records the fake upstream returns for `big.test` (too many for 512 bytes).
pub const BIG_COUNT: u8 = 60;

fn query_message(name: &str, rtype: RecordType, edns: bool) -> Message {
    let mut m = Message::query();
    m.metadata.id = rand_id();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        m.set_edns(e);
    }
    m
}

fn rand_id() -> u16 {
    rand::random()
}

/// One query over UDP (with EDNS when `edns`).
pub async fn udp(server: SocketAddr, name: &str, rtype: RecordType, edns: bool) -> Message {
    let q = query_message(name, rtype, edns);
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(&q.to_vec().unwrap(), server).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let (n, _) = tokio::time::timeout(Duration::from_secs(10), sock.recv_from(&mut buf))
        .await
        .expect("UDP answer within 10 s")
        .unwrap();
    let m = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(m.metadata.id, q.metadata.id);
    m
}

/// One query over TCP.
pub async fn tcp(server: SocketAddr, name: &str, rtype: RecordType) -> Message {
    let q = query_message(name, rtype, false);
    let bytes = q.to_vec().unwrap();
    let mut s = TcpStream::connect(server).await.unwrap();
    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&bytes);
    s.write_all(&framed).await.unwrap();
    let read = async {
        let len = s.read_u16().await.unwrap() as usize;
        let mut buf = vec![0u8; len];
        s.read_exact(&mut buf).await.unwrap();
        buf
    };
    let buf = tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("TCP answer within 10 s");
    let m = Message::from_vec(&buf).unwrap();
    assert_eq!(m.metadata.id, q.metadata.id);
    m
}

/// The IPv4 addresses in the answer section.
pub fn a_records(m: &Message) -> Vec<Ipv4Addr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

/// A fake upstream resolver: `example.test` A -> [`EXAMPLE_IP`], `big.test` A -> [`BIG_COUNT`]
/// addresses, anything else NXDOMAIN. Serves UDP and TCP on one loopback address.
pub struct FakeUpstream {
    pub addr: SocketAddr,
    server: Server<FakeUpstreamHandler>,
}

impl FakeUpstream {
    /// Starts on `ip`, a free port.
    pub async fn start(ip: Ipv4Addr) -> FakeUpstream {
        let udp = UdpSocket::bind((ip, 0)).await.unwrap();
        let addr = udp.local_addr().unwrap();
        let tcp = tokio::net::TcpListener::bind(addr).await.unwrap();
        let mut server = Server::new(FakeUpstreamHandler);
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(5), 16);
        FakeUpstream { addr, server }
    }

    pub async fn stop(mut self) {
        self.server.shutdown_gracefully().await.unwrap();
    }
}

struct FakeUpstreamHandler;

#[async_trait::async_trait]
impl RequestHandler for FakeUpstreamHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        let q = &request.queries.queries()[0];
        let name = q.original().name().clone();
        let lower = name.to_lowercase().to_ascii();
        let mut meta = Metadata::response_from_request(&request.metadata);
        meta.recursion_available = true;
        let mut answers = Vec::new();
        match (lower.as_str(), q.query_type()) {
            ("example.test.", RecordType::A) => {
                answers.push(Record::from_rdata(name, 60, RData::A(A(EXAMPLE_IP))));
            }
            ("big.test.", RecordType::A) => {
                for i in 0..BIG_COUNT {
                    let ip = Ipv4Addr::new(198, 51, 100, i + 1);
                    answers.push(Record::from_rdata(name.clone(), 60, RData::A(A(ip))));
                }
            }
            ("example.test.", _) | ("big.test.", _) => {}
            _ => meta.response_code = ResponseCode::NXDomain,
        }
        let edns = request.edns.as_ref().map(|req| {
            let mut e = Edns::new();
            e.set_max_payload(req.max_payload());
            e
        });
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(e) = edns.as_ref() {
            builder.edns(e);
        }
        let msg = builder.build(meta, answers.iter(), [], [], []);
        response.send_response(msg).await.unwrap()
    }
}
