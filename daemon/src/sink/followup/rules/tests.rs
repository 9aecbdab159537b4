use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use liveomics_adapters::model::{AcquisitionPlan, Field, FieldKey, Origin, WellId};

use super::*;
use crate::field::CellRecord;

fn plan() -> Arc<AcquisitionPlan> {
    let channels = ["DAPI".to_string(), "FITC".to_string()];
    Arc::new(AcquisitionPlan::open_ended("P1", 96, &channels, (64, 64), 1.0, 1).unwrap())
}

fn rules(closed_loop: &str) -> Rules {
    let text = format!("[closed_loop]\nenabled = true\n{closed_loop}");
    let table: toml::Table = toml::from_str(&text).unwrap();
    let c: ClosedLoopConfig = table["closed_loop"].clone().try_into().unwrap();
    Rules::new(&c, "scope1", &plan())
}

/// A finished field of `well` with `cells` cells of `area_px` each, at stage (100, 200, 5) µm.
fn work(well: &str, field: u32, cells: usize, area_px: u32) -> FieldWork {
    let plan = plan();
    let key = FieldKey {
        plate: plan.plate.clone(),
        well: WellId::parse(well, plan.format).unwrap(),
        field,
        timepoint: 0,
    };
    let f = Field {
        key,
        width: 64,
        height: 64,
        channels: vec![None, None],
        acquired_at: SystemTime::now(),
        received_at: Instant::now(),
        origin: Origin {
            stage_um: Some([100.0, 200.0, 5.0]),
            ..Origin::default()
        },
    };
    let mut w = FieldWork::new(f, plan, Instant::now());
    w.records = (0..cells)
        .map(|i| CellRecord {
            label: i as u32 + 1,
            centroid_x_px: 0.0,
            centroid_y_px: 0.0,
            area_px,
            nucleus_area_px: area_px / 2,
            bbox_min_x: 0,
            bbox_min_y: 0,
            bbox_max_x: 1,
            bbox_max_y: 1,
            mean_intensity: vec![100.0, 200.0],
        })
        .collect();
    w
}

const MORE: &str = r#"
max_followups_per_plate = 2
[[closed_loop.rules]]
name = "busy"
metric = "cells"
scope = "field"
comparison = ">="
threshold = 3
cooldown_s = 60
action = { kind = "more_fields", fields = 2, spacing_um = 300.0 }
"#;

#[test]
fn a_field_rule_fires_with_events_then_honours_cooldown_threshold_and_budget() {
    let mut r = rules(MORE);
    let t0 = Instant::now();
    let fired = r.field(&work("A1", 0, 5, 100), t0);
    assert_eq!(fired.len(), 1);
    let b = &fired[0].body;
    assert_eq!((b["plate"].as_str(), b["well"].as_str()), (Some("P1"), Some("A1")));
    assert_eq!(b["fields"], json!([1000, 1001]));
    assert_eq!(b["trigger"]["cells"], json!(5));
    let events = b["events"].as_array().unwrap();
    assert_eq!(events.len(), 4, "2 fields x 2 channels");
    assert_eq!(events[0]["x_pos"], json!(400.0));
    assert_eq!(events[2]["x_pos"], json!(700.0));
    assert_eq!(events[0]["channel"], json!({"config": "DAPI", "group": "Channel"}));
    assert_eq!(events[0]["metadata"]["liveomics"]["followup_id"], json!(fired[0].id));
    assert_eq!(fired[0].topic, "liveomics/scope1/followup/P1");
    r.sent(&fired[0], t0);
    assert_eq!(r.state(&fired[0].id), Some(FollowupState::Requested));

    assert!(
        r.field(&work("A1", 1, 5, 100), t0 + Duration::from_secs(1)).is_empty(),
        "cooldown"
    );
    assert!(r.field(&work("B1", 0, 2, 100), t0).is_empty(), "below the threshold");
    let again = r.field(&work("A1", 2, 5, 100), t0 + Duration::from_secs(61));
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].body["fields"], json!([1002, 1003]));
    r.sent(&again[0], t0 + Duration::from_secs(61));
    assert!(
        r.field(&work("B1", 1, 9, 100), t0).is_empty(),
        "the plate's budget of 2 is spent"
    );
}

#[test]
fn a_rule_fires_on_a_field_analysed_late_and_says_how_late() {
    let mut r = rules(MORE);
    let mut w = work("A1", 0, 5, 100);
    w.field.received_at = Instant::now() - Duration::from_secs(30);
    w.stages_done_at = Some(Instant::now());
    w.raw_stored = true;
    let fired = r.field(&w, Instant::now());
    assert_eq!(fired.len(), 1);
    let trigger = &fired[0].body["trigger"];
    assert_eq!(trigger["late"], json!(true));
    assert!(trigger["lag_ms"].as_u64().unwrap() >= 30_000, "{trigger}");
    let live = r.field(&work("B1", 0, 5, 100), Instant::now());
    assert_eq!(live[0].body["trigger"]["late"], json!(false));
}

#[test]
fn a_well_rule_pools_the_fields_of_the_well() {
    let mut r = rules(
        r#"
[[closed_loop.rules]]
name = "big"
metric = "area_px"
scope = "well"
comparison = ">"
threshold = 150
action = { kind = "channels", channels = ["FITC"] }
"#,
    );
    let now = Instant::now();
    assert!(r.field(&work("C3", 0, 10, 100), now).is_empty(), "mean 100");
    assert!(
        r.field(&work("D4", 0, 10, 300), now).len() == 1,
        "another well: mean 300"
    );
    let fired = r.field(&work("C3", 1, 10, 300), now);
    assert_eq!(fired.len(), 1, "C3 pooled: mean 200");
    assert_eq!(fired[0].body["trigger"]["value"], json!(200.0));
    assert_eq!(fired[0].body["trigger"]["cells"], json!(20));
}

#[test]
fn follow_up_fields_fire_nothing_and_move_the_numbering_on() {
    let mut r = rules(MORE);
    let mut answer = work("A1", 1005, 9, 100);
    answer.field.origin.followup_id = Some("busy-P1-7".into());
    assert!(r.field(&answer, Instant::now()).is_empty());
    let fired = r.field(&work("A1", 0, 5, 100), Instant::now());
    assert_eq!(fired[0].body["fields"], json!([1006, 1007]));
}

#[test]
fn acks_only_move_forward_and_final_states_stay() {
    let mut r = rules(MORE);
    let now = Instant::now();
    let a = r.field(&work("A1", 0, 5, 100), now).remove(0);
    r.sent(&a, now);
    let b = r.field(&work("B2", 0, 5, 100), now).remove(0);
    r.sent(&b, now);
    let ack = |id: &str, state: &str| format!(r#"{{"id": "{id}", "state": "{state}"}}"#).into_bytes();
    r.ack(&ack(&a.id, "scheduled"));
    assert_eq!(r.state(&a.id), Some(FollowupState::Scheduled));
    r.ack(&ack(&a.id, "started"));
    r.ack(&ack(&a.id, "scheduled"));
    assert_eq!(
        r.state(&a.id),
        Some(FollowupState::Started),
        "a late ack does not go back"
    );
    r.ack(&ack(&a.id, "done"));
    r.ack(&ack(&a.id, "rejected"));
    assert_eq!(r.state(&a.id), Some(FollowupState::Done), "done stays done");
    r.ack(br#"{"id": "busy-P1-2", "state": "rejected", "reason": "count"}"#);
    assert_eq!(r.state(&b.id), Some(FollowupState::Rejected));
    r.ack(&ack(&b.id, "started"));
    assert_eq!(r.state(&b.id), Some(FollowupState::Rejected), "rejected stays rejected");
    for bad in [
        &b"not json"[..],
        br#"{"id": 3}"#,
        br#"{"id": "x", "state": "done"}"#,
        br#"{"id": "busy-P1-1", "state": "teleported"}"#,
    ] {
        r.ack(bad);
    }
    assert_eq!(r.state("x"), None);
    assert!(r.open().is_empty(), "{:?}", r.open());
}

#[test]
fn a_request_not_done_in_time_is_reported_once() {
    let mut r = rules(&format!("request_timeout_ms = 5000\n{MORE}"));
    let now = Instant::now();
    let a = r.field(&work("A1", 0, 5, 100), now).remove(0);
    r.sent(&a, now);
    assert!(r.timeouts(now + Duration::from_secs(1)).is_empty());
    assert_eq!(r.timeouts(now + Duration::from_secs(6)), vec![a.id.clone()]);
    assert!(r.timeouts(now + Duration::from_secs(7)).is_empty(), "once");
    assert_eq!(r.open(), vec![&a.id], "still open: it may yet be done");
}

#[test]
fn another_members_requests_start_cooldowns_spend_the_budget_and_take_field_numbers() {
    let mut a = rules(MORE).in_cluster("m0");
    let mut b = rules(MORE).in_cluster("m1");
    let t0 = Instant::now();
    let fired = a.field(&work("A1", 0, 5, 100), t0);
    assert_eq!(fired.len(), 1);
    a.sent(&fired[0], t0);
    assert!(fired[0].id.contains("-m0-"), "{}", fired[0].id);
    let bytes = serde_json::to_vec(&fired[0].body).unwrap();
    assert_eq!(b.observed(&bytes, t0).as_deref(), Some(fired[0].id.as_str()));
    // The well changed hands: its new member is in the cooldown the old one started.
    assert!(b.field(&work("A1", 1, 5, 100), t0 + Duration::from_secs(1)).is_empty());
    let later = b.field(&work("A1", 2, 5, 100), t0 + Duration::from_secs(61));
    assert_eq!(later.len(), 1);
    assert_eq!(
        later[0].body["fields"],
        json!([1002, 1003]),
        "after the other member's 1000, 1001"
    );
    b.sent(&later[0], t0 + Duration::from_secs(61));
    // Two requests over the two members: the plate's budget of 2 is spent for both.
    assert!(b.field(&work("B1", 0, 9, 100), t0).is_empty());
    assert_eq!(
        a.observed(&serde_json::to_vec(&later[0].body).unwrap(), t0),
        Some(later[0].id.clone())
    );
    assert!(a.field(&work("C1", 0, 9, 100), t0).is_empty());
    assert_eq!(a.observed(b"not json", t0), None);
}
