//! Flows as the conntrack table knows them: a tuple per direction, the
//! backend an entry sends a flow to, and the service (destination) a
//! sender addressed.

use std::{fmt, net::IpAddr};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub fn of(addr: IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::Ipv4,
            IpAddr::V6(_) => Family::Ipv6,
        }
    }

    /// As `conntrack -f` names it.
    pub fn name(self) -> &'static str {
        match self {
            Family::Ipv4 => "ipv4",
            Family::Ipv6 => "ipv6",
        }
    }
}

/// A transport protocol, by IANA number, named where stalewatch knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Proto(pub u8);

impl Proto {
    pub const TCP: Proto = Proto(6);
    pub const UDP: Proto = Proto(17);
    pub const SCTP: Proto = Proto(132);

    pub fn name(self) -> String {
        match self.0 {
            1 => "icmp".into(),
            6 => "tcp".into(),
            17 => "udp".into(),
            58 => "icmpv6".into(),
            132 => "sctp".into(),
            136 => "udplite".into(),
            n => n.to_string(),
        }
    }

    /// From its name as rule engines write it (`udp`, `ipv6-icmp`) or its
    /// number.
    pub fn from_name(name: &str) -> Option<Proto> {
        match name {
            "icmp" => Some(Proto(1)),
            "tcp" => Some(Proto::TCP),
            "udp" => Some(Proto::UDP),
            "ipv6-icmp" | "icmpv6" => Some(Proto(58)),
            "sctp" => Some(Proto::SCTP),
            "udplite" => Some(Proto(136)),
            other => other.parse().ok().map(Proto),
        }
    }

    /// Whether the tuple's port fields are ports (not ICMP ids).
    pub fn has_ports(self) -> bool {
        matches!(self.0, 6 | 17 | 33 | 132 | 136)
    }
}

impl serde::Serialize for Proto {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

/// One direction of a conntrack entry.
///
/// For ICMP and ICMPv6 `sport` is the echo id and `dport` is
/// `type << 8 | code`, which is where the kernel keeps them in its tuple.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tuple {
    pub family: Family,
    pub proto: Proto,
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
}

impl Tuple {
    /// Where the sender addressed it.
    pub fn service(&self) -> Service {
        Service {
            proto: self.proto,
            addr: self.dst,
            port: self.dport,
        }
    }

    /// Where it comes from: in a reply tuple, the backend a DNATed entry
    /// sends its flow to.
    pub fn source(&self) -> Backend {
        Backend::new(self.src, self.sport)
    }
}

/// `[addr]:port` for IPv6, `addr:port` for IPv4.
pub fn addr_port(addr: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(addr, port).to_string()
}

/// Where an entry sends a flow: an address and a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    pub addr: IpAddr,
    pub port: u16,
}

impl Backend {
    pub fn new(addr: IpAddr, port: u16) -> Backend {
        Backend { addr, port }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&addr_port(self.addr, self.port))
    }
}

/// A destination as senders address it: protocol, address and port. The
/// one key for "the flows of a service"; where namespaces matter, it goes
/// with the namespace's inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Service {
    pub proto: Proto,
    pub addr: IpAddr,
    pub port: u16,
}

impl Service {
    pub fn family(&self) -> Family {
        Family::of(self.addr)
    }
}

/// `addr:port/proto`, as evidence and metric labels name a service.
impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            addr_port(self.addr, self.port),
            self.proto.name()
        )
    }
}

/// The two tuples of an IPv4 entry in 24 bytes, their protocol apart
/// (two [`Tuple`]s take 80): for what is kept by the hundred thousand,
/// where the protocol byte can sit in the holder's padding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TuplesV4 {
    /// Original source and destination, reply source and destination.
    addrs: [[u8; 4]; 4],
    ports: [u16; 4],
}

impl TuplesV4 {
    /// `None` unless both tuples are IPv4 ones of one protocol.
    pub fn pack(orig: &Tuple, reply: &Tuple) -> Option<TuplesV4> {
        let (o, r) = (orig, reply);
        match (o.src, o.dst, r.src, r.dst) {
            (IpAddr::V4(os), IpAddr::V4(od), IpAddr::V4(rs), IpAddr::V4(rd))
                if o.family == Family::Ipv4 && r.family == Family::Ipv4 && o.proto == r.proto =>
            {
                Some(TuplesV4 {
                    addrs: [os.octets(), od.octets(), rs.octets(), rd.octets()],
                    ports: [o.sport, o.dport, r.sport, r.dport],
                })
            }
            _ => None,
        }
    }

    /// The original and reply tuples, of protocol `proto`.
    pub fn unpack(&self, proto: Proto) -> (Tuple, Tuple) {
        let tuple = |at: usize| Tuple {
            family: Family::Ipv4,
            proto,
            src: IpAddr::from(self.addrs[at]),
            sport: self.ports[at],
            dst: IpAddr::from(self.addrs[at + 1]),
            dport: self.ports[at + 1],
        };
        (tuple(0), tuple(2))
    }
}

/// A UDP tuple from text, for tests of every stage (here and in the
/// `tests` crate): panics on a malformed address.
#[doc(hidden)]
pub fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Tuple {
    let src: IpAddr = src.parse().expect("an address");
    Tuple {
        family: Family::of(src),
        proto: Proto::UDP,
        src,
        sport,
        dst: dst.parse().expect("an address"),
        dport,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_with_ports_read_as_people_write_them() {
        let v6 = udp("2001:db8::2", 5353, "2001:db8:1::10", 53);
        assert_eq!(v6.service().to_string(), "[2001:db8:1::10]:53/udp");
        assert_eq!(v6.source().to_string(), "[2001:db8::2]:5353");
        let v4 = udp("192.0.2.2", 40000, "192.0.2.1", 8888);
        assert_eq!(v4.service().to_string(), "192.0.2.1:8888/udp");
        assert_eq!(v4.service().family(), Family::Ipv4);
        for p in [1, 6, 17, 58, 132, 136, 250] {
            assert_eq!(Proto::from_name(&Proto(p).name()), Some(Proto(p)));
        }
        assert_eq!(Proto::from_name("ipv6-icmp"), Some(Proto(58)));
    }

    #[test]
    fn ipv4_tuples_pack_and_come_back_whole() {
        let orig = udp("192.0.2.2", 40000, "10.96.0.10", 53);
        let reply = udp("10.244.1.7", 53, "192.0.2.2", 40001);
        let packed = TuplesV4::pack(&orig, &reply).expect("IPv4");
        assert_eq!(packed.unpack(Proto::UDP), (orig, reply));
        assert_eq!(size_of::<TuplesV4>(), 24);
        let v6 = udp("2001:db8::2", 5353, "2001:db8:1::10", 53);
        assert_eq!(TuplesV4::pack(&v6, &v6), None);
        let tcp = Tuple {
            proto: Proto::TCP,
            ..reply
        };
        assert_eq!(TuplesV4::pack(&orig, &tcp), None);
    }
}
