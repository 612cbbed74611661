//! Cluster operations over the real embedded store: validation, allocation, and races.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use shoal_api::model::{PortConfig, Protocol, PublishMode};
use shoal_api::wire::{NetworkAttach, NetworkCreate, ServiceCreate, ServiceUpdate};
use shoal_control::cluster::{Cluster, ClusterError};
use shoal_control::store::embedded::EmbeddedStore;

fn cluster() -> (Cluster, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    (Cluster::new(Arc::new(store)), dir)
}

fn net(name: &str, subnet: Option<&str>) -> NetworkCreate {
    NetworkCreate {
        name: name.into(),
        subnet: subnet.map(str::to_string),
        ..Default::default()
    }
}

fn svc(name: &str, nets: &[&str], ports: &[&str]) -> ServiceCreate {
    ServiceCreate {
        name: name.into(),
        networks: nets
            .iter()
            .map(|n| NetworkAttach {
                network: (*n).into(),
                aliases: vec![],
            })
            .collect(),
        replicas: 1,
        ports: ports
            .iter()
            .map(|p| PortConfig::parse(p).unwrap())
            .collect(),
        command: vec!["true".into()],
        ..Default::default()
    }
}

#[tokio::test]
async fn networks_get_pool_subnets_and_vnis_and_refuse_conflicts() {
    let (c, _d) = cluster();
    let a = c.create_network(net("a", None)).await.unwrap();
    let b = c.create_network(net("b", None)).await.unwrap();
    assert_eq!(
        (a.subnet.to_string(), a.gateway.to_string(), a.vni),
        ("10.0.0.0/24".into(), "10.0.0.1".into(), 4096)
    );
    assert_eq!((b.subnet.to_string(), b.vni), ("10.0.1.0/24".into(), 4097));
    // A user subnet covering the next /24 makes the pool skip it.
    c.create_network(net("c", Some("10.0.2.0/23")))
        .await
        .unwrap();
    assert_eq!(
        c.create_network(net("d", None))
            .await
            .unwrap()
            .subnet
            .to_string(),
        "10.0.4.0/24"
    );
    let e = c
        .create_network(net("e", Some("10.0.0.128/25")))
        .await
        .unwrap_err();
    assert!(
        matches!(e, ClusterError::Conflict(_)) && e.to_string().contains("overlaps 10.0.0.0/24"),
        "{e}"
    );
    let e = c
        .create_network(net("a", Some("10.9.0.0/24")))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
    let e = c
        .create_network(net("f", Some("10.255.1.0/24")))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("ingress"), "{e}");
    let e = c
        .create_network(NetworkCreate {
            gateway: Some("10.9.9.9".into()),
            ..net("g", Some("10.8.0.0/24"))
        })
        .await
        .unwrap_err();
    assert!(e.to_string().contains("10.9.9.9"), "{e}");
    assert_eq!(
        c.networks().await.unwrap().len(),
        4,
        "refused requests wrote nothing"
    );
}

#[tokio::test]
async fn services_get_vips_and_ports_and_release_them() {
    let (c, _d) = cluster();
    c.create_network(net("appnet", Some("10.10.0.0/29")))
        .await
        .unwrap();
    let web = c
        .create_service(svc(
            "web",
            &["appnet"],
            &["published=8080,target=80", "80/udp"],
        ))
        .await
        .unwrap();
    let vip = web.networks[0].vip.unwrap();
    assert_eq!(
        vip.to_string(),
        "10.10.0.2",
        "first host address after the gateway"
    );
    assert_eq!(web.ports[0].published, 8080);
    assert_eq!(
        (web.ports[1].published, web.ports[1].protocol),
        (30000, Protocol::Udp),
        "auto-picked ingress port"
    );
    let e = c
        .create_service(svc("api", &["appnet"], &["8080:81"]))
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("8080/tcp is already published"),
        "{e}"
    );
    // Same number, other protocol: fine.
    let api = c
        .create_service(svc("api", &["appnet"], &["8080:81/udp"]))
        .await
        .unwrap();
    assert_ne!(api.networks[0].vip, Some(vip));
    let e = c
        .create_service(svc("x", &["nope"], &[]))
        .await
        .unwrap_err();
    assert!(matches!(e, ClusterError::NotFound(_)), "{e}");
    let e = c.remove_network("appnet").await.unwrap_err();
    assert!(
        e.to_string().contains("in use by service(s) api, web"),
        "{e}"
    );
    // Host mode cannot take a port published in ingress mode (nor the reverse).
    let e = c
        .create_service(svc("h", &[], &["published=8080,target=80,mode=host"]))
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("8080/tcp is already published by service \"web\""),
        "{e}"
    );
    let h = c
        .create_service(svc("h", &[], &["published=9000,target=80,mode=host"]))
        .await
        .unwrap();
    assert_eq!(h.ports[0].mode, PublishMode::Host);

    // Port changes: remove one, add one; the other stays.
    let web = c
        .update_service(
            "web",
            ServiceUpdate {
                publish_rm: vec!["8080".into()],
                publish_add: vec![PortConfig::parse("9090:80").unwrap()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let ports: Vec<u16> = web.ports.iter().map(|p| p.published).collect();
    assert_eq!(ports, [30000, 9090]);
    c.create_service(svc("reuse", &[], &["8080:80"]))
        .await
        .expect("8080 was released");
    let e = c
        .update_service(
            "web",
            ServiceUpdate {
                publish_rm: vec!["1234".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("1234"), "{e}");

    // rm releases the VIP; allocation is serial, so it is handed out again only after the
    // rest of the subnet (.2-.6 in a /29) has been used.
    c.remove_service("web").await.unwrap();
    let again = c
        .create_service(svc("again", &["appnet"], &[]))
        .await
        .unwrap();
    assert_eq!(again.networks[0].vip.unwrap().to_string(), "10.10.0.4");
    let mut last = None;
    for i in 0..3 {
        last = c
            .create_service(svc(&format!("more{i}"), &["appnet"], &[]))
            .await
            .unwrap()
            .networks[0]
            .vip;
    }
    assert_eq!(last, Some(vip), "the released VIP comes back last");
    let e = c.remove_service("web").await.unwrap_err();
    assert!(matches!(e, ClusterError::NotFound(_)));
}

#[tokio::test]
async fn subnet_exhaustion_is_a_clear_error() {
    let (c, _d) = cluster();
    c.create_network(net("tiny", Some("10.10.0.0/29")))
        .await
        .unwrap();
    // /29: .2-.6 usable (gateway .1): five services, the sixth fails.
    for i in 0..5 {
        c.create_service(svc(&format!("s{i}"), &["tiny"], &[]))
            .await
            .unwrap();
    }
    let e = c
        .create_service(svc("s5", &["tiny"], &[]))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no free address"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creations_never_share_an_address_or_port() {
    let (c, _d) = cluster();
    c.create_network(net("appnet", Some("10.10.0.0/24")))
        .await
        .unwrap();
    let mut handles = vec![];
    for i in 0..40 {
        let c = c.clone();
        handles.push(tokio::spawn(async move {
            c.create_service(svc(&format!("s{i}"), &["appnet"], &["80"]))
                .await
        }));
    }
    let mut vips = HashSet::new();
    let mut ports = HashSet::new();
    for h in handles {
        let s = h.await.unwrap().unwrap();
        assert!(
            vips.insert(s.networks[0].vip.unwrap()),
            "VIP handed out twice"
        );
        assert!(ports.insert(s.ports[0].published), "port handed out twice");
    }
    // Tasks racing for addresses on the same network.
    let nets: BTreeMap<String, shoal_api::model::Network> = c
        .networks()
        .await
        .unwrap()
        .into_iter()
        .map(|n| (n.name.clone(), n))
        .collect();
    let s0 = c.service("s0").await.unwrap();
    let rev = c
        .store
        .get(&shoal_control::keys::service("s0"))
        .await
        .unwrap()
        .unwrap()
        .mod_revision;
    let mut handles = vec![];
    for slot in 0..30 {
        let (c, s0, nets) = (c.clone(), s0.clone(), nets.clone());
        handles.push(tokio::spawn(async move {
            loop {
                if let Some(t) = c
                    .create_task(&s0, rev, slot, "n1", &nets.values().collect::<Vec<_>>())
                    .await
                    .unwrap()
                {
                    return t;
                }
            }
        }));
    }
    let mut ips = HashSet::new();
    for h in handles {
        let t = h.await.unwrap();
        let ip = t.networks[0].ip;
        assert!(
            !vips.contains(&ip) && ips.insert(ip),
            "address {ip} handed out twice"
        );
    }
}

#[tokio::test]
async fn a_slot_never_gets_two_live_tasks() {
    let (c, _d) = cluster();
    c.create_network(net("appnet", None)).await.unwrap();
    let s = c
        .create_service(svc("web", &["appnet"], &[]))
        .await
        .unwrap();
    let rev = c
        .store
        .get(&shoal_control::keys::service("web"))
        .await
        .unwrap()
        .unwrap()
        .mod_revision;
    let nets: BTreeMap<String, shoal_api::model::Network> = c
        .networks()
        .await
        .unwrap()
        .into_iter()
        .map(|n| (n.name.clone(), n))
        .collect();
    let first = c
        .create_task(&s, rev, 1, "n1", &nets.values().collect::<Vec<_>>())
        .await
        .unwrap()
        .expect("slot 1 is free");
    // A stale orchestrator view that does not see `first` yet: refused, nothing written.
    let before = c.tasks().await.unwrap().len();
    assert!(
        c.create_task(&s, rev, 1, "n1", &nets.values().collect::<Vec<_>>())
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(c.tasks().await.unwrap().len(), before);
    // Once the holder is no longer meant to run (failed, scaled away), a replacement may take it.
    let failed = c
        .update_task(&first.id, |t| {
            let mut t = t.clone();
            t.desired_state = shoal_api::model::TaskState::Shutdown;
            Some(t)
        })
        .await
        .unwrap()
        .expect("written");
    let second = c
        .create_task(&s, rev, 1, "n1", &nets.values().collect::<Vec<_>>())
        .await
        .unwrap()
        .expect("slot 1 is free again");
    // Deleting the old task does not free the slot its replacement holds.
    c.delete_task(&failed).await.unwrap();
    assert!(
        c.create_task(&s, rev, 1, "n1", &nets.values().collect::<Vec<_>>())
            .await
            .unwrap()
            .is_none()
    );
    assert_ne!(first.networks[0].ip, second.networks[0].ip);
}

#[tokio::test]
async fn one_transaction_creates_several_tasks_with_distinct_addresses() {
    let (c, _d) = cluster();
    c.create_network(net("appnet", None)).await.unwrap();
    let s = c
        .create_service(svc("web", &["appnet"], &[]))
        .await
        .unwrap();
    let rev = c
        .store
        .get(&shoal_control::keys::service("web"))
        .await
        .unwrap()
        .unwrap()
        .mod_revision;
    let nets: BTreeMap<String, shoal_api::model::Network> = c
        .networks()
        .await
        .unwrap()
        .into_iter()
        .map(|n| (n.name.clone(), n))
        .collect();
    let placements: Vec<(u32, String)> = (1..=5)
        .map(|slot| (slot, format!("n{}", slot % 2)))
        .collect();
    let made = c
        .create_tasks(&s, rev, &placements, &nets.values().collect::<Vec<_>>())
        .await
        .unwrap();
    assert_eq!(made.len(), 5);
    let ips: HashSet<_> = made.iter().map(|t| t.networks[0].ip).collect();
    assert_eq!(ips.len(), 5);
    // Again with the same slots: all taken, nothing written.
    assert!(
        c.create_tasks(&s, rev, &placements, &nets.values().collect::<Vec<_>>())
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(c.tasks().await.unwrap().len(), 5);
}
