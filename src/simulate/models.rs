//! What the simulation assumes about each backend: how long an agent takes from create (or start) to taking
//! jobs, how the backend bills, what machines cost, how often a create finds no capacity, and how `watch` meets
//! it (a container backend's create holds the cycle until the container runs; Incus wakes the loop with events).
//!
//! Defaults per backend kind, each overridable in the config (`backends.NAME.simulation`) and by flags:
//!
//! | kind     | boot time  | create holds the cycle | events wake the loop | prices                        |
//! |----------|------------|------------------------|----------------------|-------------------------------|
//! | `incus`  | 1s-2s      | yes (container start)  | yes                  | none (own hardware)           |
//! | `hcloud` | 40s-90s    | no (cloud-init)        | no                   | bundled Hetzner list (EUR)    |
//! | `aws`    | 45s-100s   | no (user data)         | no                   | bundled EC2 list (USD)        |
//! | `fake`   | 1s         | yes (it can exec)      | no                   | none                          |
//!
//! Boot times are what a job waits for on a cold start: Hetzner's API answers in seconds, the server boots in
//! 10-20 s and cloud-init then starts Docker and pulls the agent image; EC2 is similar, a little slower to boot;
//! an Incus container starts in about 0.1 s here and its agent connects a second later.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use jiff::SignedDuration;

use crate::model::{BackendKind, BackendName, BackendSpec, Billing, Desired, GoDuration, Price};

/// The date of the bundled price list, shown next to every cost that uses it.
pub const BUNDLED_PRICES_DATE: &str = "2025-06-01";

/// Approximate list prices (per hour, excluding VAT) as the providers published them around
/// [`BUNDLED_PRICES_DATE`]: Hetzner Cloud (EUR, German and Finnish locations) and AWS EC2 on-demand Linux in
/// eu-central-1 (USD). They are for comparing policies, not for budgeting: set your own under
/// `backends.NAME.simulation.prices`.
const BUNDLED_PRICES: &[(&str, &str, f64, &str)] = &[
    ("hcloud", "cx22", 0.0060, "EUR"),
    ("hcloud", "cx32", 0.0108, "EUR"),
    ("hcloud", "cx42", 0.0259, "EUR"),
    ("hcloud", "cx52", 0.0515, "EUR"),
    ("hcloud", "cpx11", 0.0070, "EUR"),
    ("hcloud", "cpx21", 0.0120, "EUR"),
    ("hcloud", "cpx31", 0.0222, "EUR"),
    ("hcloud", "cpx41", 0.0416, "EUR"),
    ("hcloud", "cax11", 0.0060, "EUR"),
    ("hcloud", "cax21", 0.0104, "EUR"),
    ("hcloud", "cax31", 0.0200, "EUR"),
    ("hcloud", "cax41", 0.0395, "EUR"),
    ("hcloud", "ccx13", 0.0200, "EUR"),
    ("hcloud", "ccx23", 0.0396, "EUR"),
    ("aws", "t3.small", 0.024, "USD"),
    ("aws", "t3.medium", 0.048, "USD"),
    ("aws", "t3.large", 0.096, "USD"),
    ("aws", "t3.xlarge", 0.192, "USD"),
    ("aws", "t4g.medium", 0.0384, "USD"),
    ("aws", "t4g.large", 0.0768, "USD"),
    ("aws", "m6i.large", 0.115, "USD"),
    ("aws", "m6i.xlarge", 0.230, "USD"),
    ("aws", "c6i.large", 0.097, "USD"),
    ("aws", "c6i.xlarge", 0.194, "USD"),
];

/// Machine attribute keys that name the priced machine type, most specific first (as the plan's cost line reads
/// them).
pub const MACHINE_TYPE_KEYS: [&str; 5] = ["server_type", "serverType", "instance_type", "instanceType", "type"];

/// The price key that applies to every machine type without a price of its own.
pub const ANY_TYPE: &str = "*";

/// How long from a create (or start) until the agent takes jobs: fixed, or uniform between two bounds.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum BootTime {
    Fixed(SignedDuration),
    Uniform { low: SignedDuration, high: SignedDuration },
}

impl BootTime {
    /// A sample, in whole milliseconds (the simulation's outputs stay readable).
    pub fn sample(&self, rng: &mut fastrand::Rng) -> SignedDuration {
        match *self {
            BootTime::Fixed(duration) => duration,
            BootTime::Uniform { low, high } => {
                let (low, high) = (low.as_millis() as i64, high.as_millis() as i64);
                SignedDuration::from_millis(rng.i64(low..=high))
            }
        }
    }
}

impl FromStr for BootTime {
    type Err = String;
    /// `45s` or `40s-90s`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let parse =
            |part: &str| part.trim().parse::<GoDuration>().map(|duration| duration.signed()).map_err(|error| error.why);
        match text.split_once('-') {
            None => Ok(BootTime::Fixed(parse(text)?)),
            Some((low, high)) => {
                let (low, high) = (parse(low)?, parse(high)?);
                if low > high {
                    return Err(format!("the range `{text}` runs backwards; write the shorter time first"));
                }
                Ok(if low == high { BootTime::Fixed(low) } else { BootTime::Uniform { low, high } })
            }
        }
    }
}

impl fmt::Display for BootTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let go = |duration: SignedDuration| super::trace::go_duration(duration);
        match *self {
            BootTime::Fixed(duration) => f.write_str(&go(duration)),
            BootTime::Uniform { low, high } => write!(f, "{}-{}", go(low), go(high)),
        }
    }
}

impl fmt::Debug for BootTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BootTime({self})")
    }
}

/// `0.006 EUR` (or `0.006EUR`): an hourly price and its currency (3 letters).
pub fn parse_price(text: &str) -> Result<Price, String> {
    let text = text.trim();
    let split = text.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(text.len());
    let (amount, currency) = (text[..split].trim(), text[split..].trim());
    let hourly: f64 = amount.parse().map_err(|_| format!("`{text}` is not a price; write e.g. `0.006 EUR`"))?;
    if !hourly.is_finite() || hourly < 0.0 {
        return Err(format!("the price `{text}` must be zero or more"));
    }
    if currency.len() != 3 || !currency.chars().all(|c| c.is_ascii_alphabetic()) {
        return Err(format!("`{text}` has no currency; write e.g. `0.006 EUR`"));
    }
    Ok(Price { hourly, currency: currency.to_ascii_uppercase() })
}

/// A capacity error rate: a fraction from 0 to 1 (`0.05`) or a percentage (`5%`).
pub fn parse_rate(text: &str) -> Result<f64, String> {
    let text = text.trim();
    let (number, scale) = match text.strip_suffix('%') {
        Some(percent) => (percent.trim(), 100.0),
        None => (text, 1.0),
    };
    let value: f64 = number.parse().map_err(|_| format!("`{text}` is not a rate; write e.g. `0.05` or `5%`"))?;
    let rate = value / scale;
    if !(0.0..=1.0).contains(&rate) {
        return Err(format!("the rate `{text}` must be between 0 and 1 (0 % and 100 %)"));
    }
    Ok(rate)
}

/// The simulation settings of one backend as the config or the flags give them; `None`: the kind's default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    pub boot_time: Option<BootTime>,
    /// Machine type (or [`ANY_TYPE`]) → hourly price.
    pub prices: BTreeMap<String, Price>,
    pub capacity_errors: Option<f64>,
}

impl Overrides {
    /// `self` with every setting `later` makes replacing it (flags over config).
    pub fn then(mut self, later: &Overrides) -> Overrides {
        if later.boot_time.is_some() {
            self.boot_time = later.boot_time;
        }
        self.prices.extend(later.prices.iter().map(|(kind, price)| (kind.clone(), price.clone())));
        if later.capacity_errors.is_some() {
            self.capacity_errors = later.capacity_errors;
        }
        self
    }
}

/// Where a backend's prices come from, for the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PriceSource {
    /// Some or all from the config or flags.
    Given,
    /// The bundled list of [`BUNDLED_PRICES_DATE`].
    Bundled,
    /// No price known: its instances show hours but no cost.
    None,
}

/// Everything the simulation assumes about one backend.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendModel {
    pub kind: &'static str,
    pub boot_time: BootTime,
    pub billing: Billing,
    /// Prices from the config and flags (machine type or [`ANY_TYPE`]).
    pub prices: BTreeMap<String, Price>,
    /// The bundled list's prices for this kind of backend, used for types the config and flags do not price.
    pub bundled: BTreeMap<String, Price>,
    pub price_source: PriceSource,
    pub capacity_errors: f64,
    /// `watch`'s create on this backend returns only once the instance runs (containers: apply pushes the
    /// credential and execs the agent), so the cycle lasts the boot.
    pub create_holds_cycle: bool,
    /// An instance of ours that stops or goes away wakes `watch` at once (Incus lifecycle events).
    pub events_wake_loop: bool,
    /// An ephemeral agent's instance is deleted by the backend when it powers off (Incus ephemeral containers);
    /// otherwise it stays, stopped.
    pub ephemeral_deletes_itself: bool,
    /// Starting a stopped instance resets its creation time (EC2's `LaunchTime`).
    pub start_resets_created_at: bool,
}

impl BackendModel {
    /// The kind's defaults, then the overrides.
    pub fn new(spec: &BackendSpec, overrides: &Overrides) -> Self {
        let kind = spec.kind.name();
        let (boot_default, create_holds_cycle, events_wake_loop) = match &spec.kind {
            BackendKind::Incus { .. } => (uniform(1, 2), true, true),
            BackendKind::Hcloud { .. } => (uniform(40, 90), false, false),
            BackendKind::Aws { .. } => (uniform(45, 100), false, false),
            BackendKind::Fake(_) => (BootTime::Fixed(SignedDuration::from_secs(1)), true, false),
        };
        let bundled: BTreeMap<String, Price> = BUNDLED_PRICES
            .iter()
            .filter(|(bundled_kind, ..)| *bundled_kind == kind)
            .map(|(_, machine, hourly, currency)| {
                ((*machine).to_owned(), Price { hourly: *hourly, currency: (*currency).to_owned() })
            })
            .collect();
        let price_source = if !overrides.prices.is_empty() {
            PriceSource::Given
        } else if bundled.is_empty() {
            PriceSource::None
        } else {
            PriceSource::Bundled
        };
        Self {
            kind,
            boot_time: overrides.boot_time.unwrap_or(boot_default),
            billing: spec.billing,
            prices: overrides.prices.clone(),
            bundled,
            price_source,
            capacity_errors: overrides.capacity_errors.unwrap_or(0.0),
            create_holds_cycle,
            events_wake_loop,
            ephemeral_deletes_itself: matches!(spec.kind, BackendKind::Incus { .. }),
            start_resets_created_at: matches!(spec.kind, BackendKind::Aws { .. }),
        }
    }

    /// The price of a machine type: given for it, else given for [`ANY_TYPE`], else the bundled list's.
    pub fn price_of(&self, machine_type: Option<&str>) -> Option<&Price> {
        machine_type
            .and_then(|machine| self.prices.get(machine))
            .or_else(|| self.prices.get(ANY_TYPE))
            .or_else(|| machine_type.and_then(|machine| self.bundled.get(machine)))
    }

    /// Every price the planner's cost line could use: the bundled list with the given prices over it.
    pub fn price_list(&self) -> BTreeMap<String, Price> {
        let mut list = self.bundled.clone();
        list.extend(self.prices.iter().map(|(machine, price)| (machine.clone(), price.clone())));
        list
    }
}

fn uniform(low: i64, high: i64) -> BootTime {
    BootTime::Uniform { low: SignedDuration::from_secs(low), high: SignedDuration::from_secs(high) }
}

/// The model of every backend of a config: its defaults, the config's `simulation` settings, then the flags'.
pub fn models_for(
    desired: &Desired,
    from_config: &BTreeMap<BackendName, Overrides>,
    from_flags: &BTreeMap<Option<BackendName>, Overrides>,
) -> BTreeMap<BackendName, BackendModel> {
    desired
        .backends
        .iter()
        .map(|(name, spec)| {
            let mut overrides = from_config.get(name).cloned().unwrap_or_default();
            // Flags for every backend first, then flags naming this one.
            if let Some(all) = from_flags.get(&None) {
                overrides = overrides.then(all);
            }
            if let Some(this) = from_flags.get(&Some(name.clone())) {
                overrides = overrides.then(this);
            }
            (name.clone(), BackendModel::new(spec, &overrides))
        })
        .collect()
}

/// The flags' overrides (`--boot-time [BACKEND=]TIME`, `--capacity-errors [BACKEND=]RATE`,
/// `--price [BACKEND:]TYPE=PRICE`), by backend (`None`: every backend).
pub fn flag_overrides(
    boot_times: &[String],
    capacity_errors: &[String],
    prices: &[String],
) -> Result<BTreeMap<Option<BackendName>, Overrides>, String> {
    let mut overrides: BTreeMap<Option<BackendName>, Overrides> = BTreeMap::new();
    // `NAME=VALUE` or `VALUE`: a backend name never contains `=`, a value never starts a name with it.
    let split = |text: &str| -> (Option<BackendName>, String) {
        match text.split_once('=') {
            Some((name, value)) if !name.trim().is_empty() => {
                (Some(BackendName::new(name.trim())), value.trim().to_owned())
            }
            _ => (None, text.trim().to_owned()),
        }
    };
    for text in boot_times {
        let (backend, value) = split(text);
        let boot = value.parse::<BootTime>().map_err(|why| format!("`--boot-time {text}`: {why}"))?;
        overrides.entry(backend).or_default().boot_time = Some(boot);
    }
    for text in capacity_errors {
        let (backend, value) = split(text);
        let rate = parse_rate(&value).map_err(|why| format!("`--capacity-errors {text}`: {why}"))?;
        overrides.entry(backend).or_default().capacity_errors = Some(rate);
    }
    for text in prices {
        let Some((target, price)) = text.split_once('=') else {
            return Err(format!("`--price {text}` is not `TYPE=PRICE`; write e.g. `--price cx22=0.006EUR`"));
        };
        let (backend, machine) = match target.split_once(':') {
            Some((backend, machine)) => (Some(BackendName::new(backend.trim())), machine.trim()),
            None => (None, target.trim()),
        };
        let price = parse_price(price).map_err(|why| format!("`--price {text}`: {why}"))?;
        overrides.entry(backend).or_default().prices.insert(machine.to_owned(), price);
    }
    Ok(overrides)
}

/// The machine type an instance is priced by: the first of [`MACHINE_TYPE_KEYS`] present, first candidate of a
/// comma list.
pub fn machine_type(attributes: &BTreeMap<String, String>) -> Option<&str> {
    MACHINE_TYPE_KEYS
        .iter()
        .find_map(|key| attributes.get(*key))
        .map(|value| value.split(',').next().unwrap_or_default().trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_times_parse_fixed_and_ranges() {
        assert_eq!("45s".parse::<BootTime>(), Ok(BootTime::Fixed(SignedDuration::from_secs(45))));
        assert_eq!("40s-1m30s".parse::<BootTime>(), Ok(uniform(40, 90)));
        assert_eq!("1m-1m".parse::<BootTime>(), Ok(BootTime::Fixed(SignedDuration::from_secs(60))));
        assert!("90s-40s".parse::<BootTime>().unwrap_err().contains("backwards"));
        assert!("soon".parse::<BootTime>().is_err());
        assert_eq!(uniform(40, 90).to_string(), "40s-1m30s");
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..100 {
            let sample = uniform(40, 90).sample(&mut rng);
            assert!(sample >= SignedDuration::from_secs(40) && sample <= SignedDuration::from_secs(90));
        }
    }

    #[test]
    fn prices_and_rates() {
        assert_eq!(parse_price("0.006 EUR"), Ok(Price { hourly: 0.006, currency: "EUR".into() }));
        assert_eq!(parse_price("1.5usd"), Ok(Price { hourly: 1.5, currency: "USD".into() }));
        assert!(parse_price("0.006").is_err());
        assert!(parse_price("-1 EUR").is_err());
        assert_eq!(parse_rate("5%"), Ok(0.05));
        assert_eq!(parse_rate("0.2"), Ok(0.2));
        assert!(parse_rate("1.5").is_err());
    }

    #[test]
    fn machine_type_takes_the_first_candidate() {
        let attributes = BTreeMap::from([("serverType".to_owned(), "cx22, cx32".to_owned())]);
        assert_eq!(machine_type(&attributes), Some("cx22"));
    }
}
