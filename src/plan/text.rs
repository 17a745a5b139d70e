//! Small wording helpers shared by the rules' notes and reasons.

use jiff::SignedDuration;

pub(super) fn plural(count: u32, noun: &str) -> String {
    if count == 1 {
        format!("1 {noun}")
    } else {
        format!("{count} {noun}s")
    }
}

/// `31m`, `1h5m`, `45s`: minutes are precise enough for idle times; seconds only below a minute.
pub(super) fn human_duration(duration: SignedDuration) -> String {
    let secs = duration.as_secs().max(0);
    if secs < 60 {
        return format!("{secs}s");
    }
    let (hours, minutes) = (secs / 3600, (secs % 3600) / 60);
    match (hours, minutes) {
        (0, m) => format!("{m}m"),
        (h, 0) => format!("{h}h"),
        (h, m) => format!("{h}h{m}m"),
    }
}
