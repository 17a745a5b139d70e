//! A pool's `machine` map for Incus, and the same attributes read back from an instance (for drift).
//!
//! | machine key          | Incus                                                                    |
//! |----------------------|--------------------------------------------------------------------------|
//! | `image`              | source image alias (required); remembered as `user.ciscale.image`        |
//! | `cpu`                | `limits.cpu`                                                             |
//! | `memory`             | `limits.memory` (`4GiB`)                                                 |
//! | `tmpfsSize`          | a size-limited tmpfs on `/tmp` (`raw.lxc` mount entry, see below)        |
//! | `nesting`            | `security.nesting` (`"true"` for Docker inside)                          |
//! | `hostShutdownAction` | `boot.host_shutdown_action` (`stop`, `force-stop`)                       |
//! | `profiles`           | the instance's profiles, comma-separated (default: the `default` profile)|
//! | any key with a `.`   | that Incus config key, verbatim (`limits.cpu: 4`, `security.privileged`) |
//!
//! Why `raw.lxc` for the tmpfs: Incus 6.0 disk devices accept no size on anything but the root disk ("Only the
//! root disk may have a size quota") and have no tmpfs source, so the size limit can only come from an LXC
//! mount entry. Tried on incusd 6.0.4: `df /tmp` inside shows exactly the size.
//!
//! Attributes are reported under both spellings (`cpu` and `limits.cpu`) so drift works whichever one the
//! config uses; the planner compares only the keys a pool sets.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::client::PROVIDER;
use crate::providers::Error;

/// Config key remembering the alias an instance was created from: Incus keeps only the fingerprint
/// (`volatile.base_image`), and a re-provisioned alias would otherwise look like drift on every instance.
pub const IMAGE_KEY: &str = "user.ciscale.image";
/// Marker in the `raw.lxc` line that holds the `/tmp` tmpfs, so it can be found again.
const TMPFS_TARGET: &str = "tmpfs tmp tmpfs";

/// The image alias a `machine.image` value creates from. A comma list is a fallback list elsewhere; for Incus
/// the first alias is the one used.
pub fn image_alias(image: &str) -> &str {
    image.split(',').next().unwrap_or_default().trim()
}

/// What [`super::Incus::create`] sends, derived from a machine map.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceSpec {
    pub image: String,
    pub config: BTreeMap<String, String>,
    pub devices: Map<String, Value>,
    /// `None`: Incus's default (the `default` profile).
    pub profiles: Option<Vec<String>>,
}

fn invalid(message: String) -> Error {
    Error::Invalid { provider: PROVIDER.into(), message }
}

impl InstanceSpec {
    pub fn from_machine(machine: &BTreeMap<String, String>) -> Result<Self, Error> {
        let image = machine
            .get("image")
            .filter(|image| !image.trim().is_empty())
            .map(|image| image_alias(image).to_owned())
            .ok_or_else(|| {
                invalid("the pool's `machine` has no `image`\nhint: name an image alias, e.g. `image: ci-agent`".into())
            })?;
        let mut config = BTreeMap::from([(IMAGE_KEY.to_owned(), image.clone())]);
        let mut profiles = None;
        for (key, value) in machine {
            match key.as_str() {
                "image" => {}
                "cpu" => {
                    config.insert("limits.cpu".into(), value.clone());
                }
                "memory" => {
                    config.insert("limits.memory".into(), value.clone());
                }
                "nesting" => {
                    config.insert("security.nesting".into(), value.clone());
                }
                "hostShutdownAction" => {
                    config.insert("boot.host_shutdown_action".into(), value.clone());
                }
                "tmpfsSize" => {
                    let bytes = parse_size(value).ok_or_else(|| {
                        invalid(format!("`tmpfsSize: {value}` is not a size\nhint: write e.g. `4GiB` or `512MiB`"))
                    })?;
                    config.insert(
                        "raw.lxc".into(),
                        format!(
                            "lxc.mount.entry = {TMPFS_TARGET} rw,nosuid,nodev,mode=1777,size={bytes},create=dir 0 0"
                        ),
                    );
                }
                "profiles" => {
                    profiles = Some(
                        value.split(',').map(str::trim).filter(|name| !name.is_empty()).map(str::to_owned).collect(),
                    );
                }
                other if other.contains('.') => {
                    config.insert(other.to_owned(), value.clone());
                }
                other => {
                    return Err(invalid(format!(
                        "unknown incus machine key `{other}`\nhint: use `image`, `cpu`, `memory`, `tmpfsSize`, \
                         `nesting`, `hostShutdownAction`, `profiles` or an Incus config key such as `limits.cpu`"
                    )))
                }
            }
        }
        Ok(Self { image, config, devices: Map::new(), profiles })
    }
}

/// Comparable attributes of an instance (see the module table).
pub fn attributes_of(config: &BTreeMap<&str, &str>, _devices: &Value, profiles: &[&str]) -> BTreeMap<String, String> {
    let mut attributes = BTreeMap::new();
    let mut put = |key: &str, value: &str| {
        attributes.insert(key.to_owned(), value.to_owned());
    };
    if let Some(image) = config.get(IMAGE_KEY) {
        put("image", image);
    }
    if let Some(fingerprint) = config.get("volatile.base_image") {
        put("imageFingerprint", fingerprint);
    }
    for (short, long) in [
        ("cpu", "limits.cpu"),
        ("memory", "limits.memory"),
        ("nesting", "security.nesting"),
        ("hostShutdownAction", "boot.host_shutdown_action"),
    ] {
        if let Some(value) = config.get(long) {
            put(short, value);
            put(long, value);
        }
    }
    if let Some(size) = config.get("raw.lxc").and_then(|raw| tmpfs_size(raw)) {
        put("tmpfsSize", &format_size(size));
    }
    if !profiles.is_empty() {
        put("profiles", &profiles.join(","));
    }
    attributes
}

/// The `size=` of the `/tmp` tmpfs mount entry in a `raw.lxc` value.
fn tmpfs_size(raw_lxc: &str) -> Option<u64> {
    let line = raw_lxc.lines().find(|line| line.contains(TMPFS_TARGET))?;
    let options = line.split_whitespace().find(|word| word.contains("size="))?;
    options.split(',').find_map(|option| option.strip_prefix("size=")).and_then(|size| size.parse().ok())
}

/// Bytes from `4GiB`, `512MiB`, `1G`, `100M`, `2048` (binary units, as Incus and LXC read them).
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "k" | "K" | "KiB" | "KB" => 1 << 10,
        "m" | "M" | "MiB" | "MB" => 1 << 20,
        "g" | "G" | "GiB" | "GB" => 1 << 30,
        "t" | "T" | "TiB" | "TB" => 1 << 40,
        _ => return None,
    };
    number.checked_mul(factor).filter(|bytes| *bytes > 0)
}

/// The largest exact binary unit: `4GiB`, `512MiB`, `1000B`.
pub fn format_size(bytes: u64) -> String {
    for (unit, factor) in [("TiB", 1u64 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if bytes >= factor && bytes % factor == 0 {
            return format!("{}{unit}", bytes / factor);
        }
    }
    format!("{bytes}B")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn maps_machine_keys_onto_incus_config() {
        let spec = InstanceSpec::from_machine(&machine(&[
            ("image", "agent"),
            ("cpu", "2"),
            ("memory", "4GiB"),
            ("tmpfsSize", "1GiB"),
            ("nesting", "true"),
            ("hostShutdownAction", "force-stop"),
            ("profiles", "default, docker"),
            ("security.privileged", "false"),
        ]))
        .expect("valid machine");
        assert_eq!(spec.image, "agent");
        assert_eq!(spec.config["limits.cpu"], "2");
        assert_eq!(spec.config["limits.memory"], "4GiB");
        assert_eq!(spec.config["security.nesting"], "true");
        assert_eq!(spec.config["boot.host_shutdown_action"], "force-stop");
        assert_eq!(spec.config["security.privileged"], "false");
        assert_eq!(spec.config[IMAGE_KEY], "agent");
        assert!(spec.config["raw.lxc"].contains("size=1073741824"), "{}", spec.config["raw.lxc"]);
        assert_eq!(spec.profiles, Some(vec!["default".to_owned(), "docker".to_owned()]));
    }

    #[test]
    fn attributes_round_trip_what_was_asked() {
        let spec = InstanceSpec::from_machine(&machine(&[("image", "agent"), ("cpu", "2"), ("tmpfsSize", "1GiB")]))
            .expect("valid");
        let config: BTreeMap<&str, &str> = spec.config.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let attributes = attributes_of(&config, &Value::Null, &["default"]);
        assert_eq!(attributes["image"], "agent");
        assert_eq!(attributes["cpu"], "2");
        assert_eq!(attributes["limits.cpu"], "2");
        assert_eq!(attributes["tmpfsSize"], "1GiB");
    }

    #[test]
    fn refuses_what_it_cannot_honour() {
        assert!(InstanceSpec::from_machine(&machine(&[("cpu", "2")])).is_err(), "no image");
        assert!(InstanceSpec::from_machine(&machine(&[("image", "a"), ("tmpfsSize", "lots")])).is_err());
        assert!(InstanceSpec::from_machine(&machine(&[("image", "a"), ("serverType", "cx22")])).is_err());
    }

    #[test]
    fn the_first_alias_of_a_list_is_the_one_created_from() {
        assert_eq!(image_alias("agent-v2, agent-v1"), "agent-v2");
        assert_eq!(image_alias(" agent "), "agent");
        let spec = InstanceSpec::from_machine(&machine(&[("image", "agent-v2,agent-v1")])).expect("valid");
        assert_eq!(spec.image, "agent-v2");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4GiB"), Some(4 << 30));
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("0"), None);
        assert_eq!(parse_size("-1G"), None);
        assert_eq!(format_size(4 << 30), "4GiB");
        assert_eq!(format_size(1500), "1500B");
    }
}
