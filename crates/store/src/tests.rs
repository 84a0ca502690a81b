//! Store unit tests.

use super::*;
use wick_model::new_vm_id;

fn vm(name: &str, owner: u32) -> VmRecord {
    let t = now();
    VmRecord {
        id: new_vm_id(),
        name: name.into(),
        owner,
        state: VmState::Creating,
        spec: VmSpec {
            vcpu: 1,
            memory_mib: 512,
            disk_mib: 1024,
            image: "default".into(),
            kernel: "/k".into(),
            initrd: None,
            boot_args: String::new(),
            vmm: "firecracker".into(),
            nat: false,
            ..Default::default()
        },
        runtime: VmRuntime::default(),
        created_at: t.clone(),
        updated_at: t.clone(),
        touched_at: t,
    }
}

#[test]
fn create_get_save_delete() {
    let s = Store::open_in_memory().unwrap();
    let a = s.create_vm(vm("a1", 0)).unwrap();
    assert_eq!(a.runtime.guest_cid, FIRST_GUEST_CID);
    let b = s.create_vm(vm("b1", 0)).unwrap();
    assert_eq!(b.runtime.guest_cid, FIRST_GUEST_CID + 1);
    let mut got = s.get_vm(&a.id).unwrap();
    assert_eq!(got.name, "a1");
    got.state = VmState::Running;
    got.runtime.root_disk = Some("/x".into());
    s.save_vm(&got).unwrap();
    let again = s.find_vm("a1", None).unwrap();
    assert_eq!(again.state, VmState::Running);
    assert_eq!(again.runtime.root_disk.as_deref(), Some(Path::new("/x")));
    s.delete_vm(&a.id).unwrap();
    s.delete_vm(&a.id).unwrap();
    assert!(matches!(s.get_vm(&a.id), Err(StoreError::NotFound(_))));
    assert_eq!(s.counts().unwrap(), (1, 0));
}

#[test]
fn duplicate_names_refused() {
    let s = Store::open_in_memory().unwrap();
    s.create_vm(vm("a1", 0)).unwrap();
    let e = s.create_vm(vm("a1", 0)).unwrap_err();
    assert!(
        matches!(e, StoreError::NameTaken(ref n) if n == "a1"),
        "{e}"
    );
}

#[test]
fn find_by_prefix_and_owner() {
    let s = Store::open_in_memory().unwrap();
    let mut x = vm("x", 1000);
    x.id = format!("abcd1{}", &x.id[5..]);
    let mut y = vm("y", 1001);
    y.id = format!("abcd2{}", &y.id[5..]);
    s.create_vm(x.clone()).unwrap();
    s.create_vm(y.clone()).unwrap();
    assert_eq!(s.find_vm("abcd1", None).unwrap().name, "x");
    assert_eq!(s.find_vm("ABCD1", None).unwrap().name, "x");
    assert!(matches!(
        s.find_vm("abcd", None),
        Err(StoreError::Ambiguous { .. })
    ));
    // owner 1000 sees only x, so the prefix is unique for them
    assert_eq!(s.find_vm("abcd", Some(1000)).unwrap().name, "x");
    // Shorter than MIN_ID_PREFIX: a name only.
    assert!(matches!(
        s.find_vm("abc", None),
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        s.find_vm("y", Some(1000)),
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(s.list_vms(Some(1001)).unwrap().len(), 1);
    assert_eq!(s.list_vms(None).unwrap().len(), 2);
    assert!(matches!(
        s.find_vm("zz-nope", None),
        Err(StoreError::NotFound(_))
    ));
}

/// A VM named like another VM's id (a record from before names were checked, or written
/// straight to the database) never takes over lookups by that id: exact id first, then name,
/// then unique prefix.
#[test]
fn exact_id_wins_over_a_name_that_looks_like_it() {
    let s = Store::open_in_memory().unwrap();
    let victim = vm("victim", 1000);
    let mut squatter = vm("placeholder", 1001);
    squatter.name = victim.id.clone();
    s.create_vm(squatter).unwrap(); // the older row: found first by a scan
    let victim = s.create_vm(victim).unwrap();
    for owner in [None, Some(1000)] {
        assert_eq!(s.find_vm(&victim.id, owner).unwrap().name, "victim");
    }
    // Its owner, who cannot see the victim, still reaches it by its name.
    assert_eq!(s.find_vm(&victim.id, Some(1001)).unwrap().owner, 1001);
    // A name beats an id prefix (and names that look like prefixes are refused at create).
    let mut short = vm("placeholder2", 1002);
    short.name = victim.id[..12].to_string();
    s.create_vm(short).unwrap();
    assert_eq!(s.find_vm(&victim.id[..12], None).unwrap().owner, 1002);
    assert_eq!(
        s.find_vm(&victim.id[..12], Some(1000)).unwrap().name,
        "victim"
    );
}

#[test]
fn migrations_are_recorded_and_future_ones_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("w.db");
    {
        let s = Store::open(&p).unwrap();
        assert_eq!(s.schema_versions().unwrap(), vec![1, 2, 3, 4]);
    }
    {
        let c = Connection::open(&p).unwrap();
        c.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (999, 'future', 'x')",
            [],
        )
        .unwrap();
    }
    let s = Store::open(&p).unwrap();
    assert_eq!(s.schema_versions().unwrap(), vec![1, 2, 3, 4, 999]);
    assert_eq!(s.integrity_check().unwrap(), "ok");
}

#[test]
fn ip_leases_are_unique_and_sticky() {
    use std::net::Ipv4Addr;
    let s = Store::open_in_memory().unwrap();
    let a = s.create_vm(vm("a", 0)).unwrap();
    let b = s.create_vm(vm("b", 0)).unwrap();
    let range = || (2..5).map(|n| Ipv4Addr::new(10, 0, 0, n));
    let ia = s.lease_ip(&a.id, range()).unwrap().unwrap();
    assert_eq!(ia, Ipv4Addr::new(10, 0, 0, 2));
    assert_eq!(s.lease_ip(&a.id, range()).unwrap(), Some(ia), "sticky");
    let ib = s.lease_ip(&b.id, range()).unwrap().unwrap();
    assert_ne!(ia, ib);
    s.release_ip(&a.id).unwrap();
    s.release_ip(&a.id).unwrap();
    let c = s.create_vm(vm("c", 0)).unwrap();
    assert_eq!(
        s.lease_ip(&c.id, range()).unwrap(),
        Some(ia),
        "released address reused"
    );
    let d = s.create_vm(vm("d", 0)).unwrap();
    let e = s.create_vm(vm("e", 0)).unwrap();
    s.lease_ip(&d.id, range()).unwrap().unwrap();
    assert_eq!(s.lease_ip(&e.id, range()).unwrap(), None, "range exhausted");
    // deleting the VM drops its lease
    s.delete_vm(&b.id).unwrap();
    assert_eq!(s.lease_ip(&e.id, range()).unwrap(), Some(ib));
}

#[test]
fn meta_set_get_clear() {
    let s = Store::open_in_memory().unwrap();
    assert_eq!(s.get_meta("k").unwrap(), None);
    s.set_meta("k", Some("1")).unwrap();
    s.set_meta("k", Some("2")).unwrap();
    assert_eq!(s.get_meta("k").unwrap().as_deref(), Some("2"));
    s.set_meta("k", None).unwrap();
    assert_eq!(s.get_meta("k").unwrap(), None);
}

#[test]
fn vmm_uids_are_unique_sticky_and_freed_with_the_vm() {
    let s = Store::open_in_memory().unwrap();
    let a = s.create_vm(vm("a", 0)).unwrap();
    let b = s.create_vm(vm("b", 0)).unwrap();
    let c = s.create_vm(vm("c", 0)).unwrap();
    let range = || 5000..=5001;
    let ua = s.lease_uid(&a.id, range()).unwrap().unwrap();
    assert_eq!(ua, 5000);
    assert_eq!(s.lease_uid(&a.id, range()).unwrap(), Some(ua), "sticky");
    let ub = s.lease_uid(&b.id, range()).unwrap().unwrap();
    assert_eq!(ub, 5001);
    assert_eq!(
        s.lease_uid(&c.id, range()).unwrap(),
        None,
        "range exhausted"
    );
    s.release_uid(&a.id).unwrap();
    s.release_uid(&a.id).unwrap();
    assert_eq!(s.lease_uid(&c.id, range()).unwrap(), Some(5000), "reused");
    s.delete_vm(&b.id).unwrap();
    assert_eq!(
        s.lease_uid(&a.id, range()).unwrap(),
        Some(5001),
        "freed by delete"
    );
}

#[test]
fn pooled_vms_are_taken_once_each_under_concurrent_takers() {
    use std::sync::Arc;
    use wick_model::PoolSlot;
    let s = Arc::new(Store::open_in_memory().unwrap());
    for (name, slot) in [
        ("pool-a", PoolSlot::Ready),
        ("pool-b", PoolSlot::Ready),
        ("pool-c", PoolSlot::Filling),
    ] {
        let mut v = vm(name, 0);
        v.state = VmState::Running;
        v.runtime.pool = Some(slot);
        s.create_vm(v).unwrap();
    }
    let takers: Vec<_> = (0..6)
        .map(|i| {
            let s = s.clone();
            std::thread::spawn(move || {
                s.take_pooled(
                    |v| v.spec.memory_mib == 512,
                    |mut v| {
                        v.name = format!("user-{i}");
                        v.owner = 1000;
                        v.runtime.pool = Some(PoolSlot::Assigning);
                        v
                    },
                )
                .unwrap()
            })
        })
        .collect();
    let taken: Vec<VmRecord> = takers
        .into_iter()
        .filter_map(|t| t.join().unwrap())
        .collect();
    assert_eq!(taken.len(), 2, "two ready VMs, two takers served");
    assert_ne!(taken[0].id, taken[1].id, "never the same VM twice");
    for t in &taken {
        let stored = s.get_vm(&t.id).unwrap();
        assert_eq!(stored.owner, 1000);
        assert_eq!(stored.runtime.pool, Some(PoolSlot::Assigning));
        assert!(stored.name.starts_with("user-"));
    }
    // The filling one is never handed out; nothing is left to take.
    let none = s.take_pooled(|_| true, |v| v).unwrap();
    assert!(none.is_none());
}

#[test]
fn taking_a_pooled_vm_under_a_taken_name_changes_nothing() {
    use wick_model::PoolSlot;
    let s = Store::open_in_memory().unwrap();
    s.create_vm(vm("mine", 1000)).unwrap();
    let mut p = vm("pool-a", 0);
    p.runtime.pool = Some(PoolSlot::Ready);
    let p = s.create_vm(p).unwrap();
    let err = s
        .take_pooled(
            |_| true,
            |mut v| {
                v.name = "mine".into();
                v.runtime.pool = Some(PoolSlot::Assigning);
                v
            },
        )
        .unwrap_err();
    assert!(
        matches!(err, StoreError::NameTaken(ref n) if n == "mine"),
        "{err}"
    );
    let still = s.get_vm(&p.id).unwrap();
    assert_eq!(still.runtime.pool, Some(PoolSlot::Ready));
    assert_eq!(still.name, "pool-a");
    // Nor under the pool VM's own name.
    let err = s
        .take_pooled(
            |_| true,
            |mut v| {
                v.owner = 1000;
                v
            },
        )
        .unwrap_err();
    assert!(
        matches!(err, StoreError::NameTaken(ref n) if n == "pool-a"),
        "{err}"
    );
    // A pick that refuses every VM takes nothing.
    assert!(s.take_pooled(|_| false, |v| v).unwrap().is_none());
}
