use super::*;

#[test]
fn speed_parses() {
    assert_eq!(Speed::try_from("max".to_string()), Ok(Speed::Max));
    assert_eq!(Speed::try_from("realtime".to_string()), Ok(Speed::Factor(1.0)));
    assert_eq!(Speed::try_from("4x".to_string()), Ok(Speed::Factor(4.0)));
    assert!(Speed::try_from("fast".to_string()).is_err());
    assert!(Speed::try_from("0x".to_string()).is_err());
}
