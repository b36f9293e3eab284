//! Address allocation inside a configured IPv4 subnet.

use std::{collections::HashSet, net::Ipv4Addr};

use ipnet::Ipv4Net;
use sha2::{Digest, Sha256};

use crate::keys::PublicKey;

/// The box's own address in a subnet: its first host.
pub fn box_address(subnet: Ipv4Net) -> Ipv4Addr {
    subnet.hosts().next().expect("subnets are at most /30")
}

/// The lowest host of `subnet` that is neither the box's address nor in `used`.
pub fn allocate(subnet: Ipv4Net, used: &HashSet<Ipv4Addr>) -> Result<Ipv4Addr, String> {
    let own = box_address(subnet);
    subnet
        .hosts()
        .find(|a| *a != own && !used.contains(a))
        .ok_or_else(|| {
            format!(
                "the subnet {subnet} is full ({} addresses in use); widen members.subnet",
                used.len() + 1
            )
        })
}

/// A box's address in the links subnet, derived from its link key, so two boxes
/// pairing for the first time almost never collide (and a collision is refused).
pub fn link_address(subnet: Ipv4Net, key: &PublicKey) -> Ipv4Addr {
    let hosts = u32::from(subnet.broadcast()) - u32::from(subnet.network()) - 1;
    let h = Sha256::digest(key.0);
    let n = u32::from_le_bytes(h[..4].try_into().expect("4 bytes")) % hosts;
    Ipv4Addr::from(u32::from(subnet.network()) + 1 + n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SecretKey;

    #[test]
    fn allocation_skips_the_box_and_used_and_ends_when_full() {
        let net: Ipv4Net = "10.77.0.0/29".parse().unwrap();
        assert_eq!(box_address(net), Ipv4Addr::new(10, 77, 0, 1));
        let mut used = HashSet::new();
        let mut got = Vec::new();
        while let Ok(a) = allocate(net, &used) {
            used.insert(a);
            got.push(a.octets()[3]);
        }
        // .0 is the network, .1 the box, .7 broadcast.
        assert_eq!(got, vec![2, 3, 4, 5, 6]);
        assert!(allocate(net, &used).unwrap_err().contains("is full"));
        used.remove(&Ipv4Addr::new(10, 77, 0, 4));
        assert_eq!(allocate(net, &used).unwrap(), Ipv4Addr::new(10, 77, 0, 4));
    }

    #[test]
    fn link_addresses_are_hosts_of_the_subnet() {
        let net: Ipv4Net = "10.78.0.0/16".parse().unwrap();
        for _ in 0..200 {
            let k = SecretKey::generate().public();
            let a = link_address(net, &k);
            assert!(net.contains(&a) && a != net.network() && a != net.broadcast());
            assert_eq!(a, link_address(net, &k));
        }
    }
}
