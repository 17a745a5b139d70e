//! The plan's cost line: hourly cost of everything ciscale manages now and after the plan, per currency.
//!
//! An instance costs while it is pending, running or stopping; a stopped one costs too on hourly-billed
//! backends (Hetzner bills stopped servers), and nothing on per-second ones.

use std::collections::BTreeMap;

use super::fasthash::FastMap;
use super::index::{BackendIndex, Claims};
use super::machine::first_candidate;
use super::{Action, Change, Cost, CostLine, InstanceTarget};
use crate::model::{BackendName, Billing, Desired, Instance, InstanceState, Price};

/// Attribute / machine keys that name the priced machine type, most specific first.
const MACHINE_TYPE_KEYS: [&str; 5] = ["server_type", "serverType", "instance_type", "instanceType", "type"];

fn machine_type(attributes: &BTreeMap<String, String>) -> Option<&str> {
    // One pass over the (few) attributes rather than a lookup per key: every lookup compared strings in the map.
    let mut found: Option<(usize, &String)> = None;
    for (key, value) in attributes {
        if let Some(rank) = MACHINE_TYPE_KEYS.iter().position(|wanted| wanted == key) {
            if found.is_none_or(|(best, _)| rank < best) {
                found = Some((rank, value));
            }
        }
    }
    found.map(|(_, value)| first_candidate(value))
}

fn is_billed(state: InstanceState, billing: Billing) -> bool {
    state.is_active()
        || state == InstanceState::Stopping
        || (state == InstanceState::Stopped && billing == Billing::Hourly)
}

/// Sums of prices per currency plus a count of instances nobody could price.
#[derive(Default, Clone)]
struct Tally<'p> {
    /// In the order the currencies were first met. A list, not a map: a plan sees one or two currencies, and every
    /// priced instance adds to one (a map compared the currency's text on every add).
    by_currency: Vec<(&'p str, f64)>,
    unpriced: i64,
}

impl<'p> Tally<'p> {
    fn add(&mut self, price: Option<&'p Price>, sign: f64) {
        let Some(price) = price else {
            self.unpriced += sign as i64;
            return;
        };
        let currency = price.currency.as_str();
        // The prices of one backend share few currency strings: their address usually settles it.
        match self.by_currency.iter_mut().find(|(known, _)| std::ptr::eq(*known, currency) || *known == currency) {
            Some((_, sum)) => *sum += sign * price.hourly,
            // `0.0 +` as `or_default() +=` did: a first -0.0 sums to +0.0.
            None => self.by_currency.push((currency, 0.0 + sign * price.hourly)),
        }
    }

    fn get(&self, currency: &str) -> Option<f64> {
        self.by_currency.iter().find(|(known, _)| *known == currency).map(|(_, sum)| *sum)
    }
}

pub(super) fn estimate_cost(
    desired: &Desired,
    backends: &BTreeMap<&BackendName, BackendIndex<'_>>,
    changes: &[Change],
    claims: &Claims,
) -> Cost {
    let billing_of =
        |backend: &BackendName| desired.backends.get(backend).map_or(Billing::PerSecond, |spec| spec.billing);
    // Every managed instance (claimed by a pool, or labelled with our owner) with its price and billed state, by
    // backend and position.
    let mut managed: FastMap<&BackendName, Vec<Option<(Option<&Price>, bool)>>> = FastMap::default();
    let mut before = Tally::default();
    for backend in backends.values() {
        let billing = billing_of(backend.name);
        let prices = &backend.observation.prices;
        let mut of_backend = Vec::with_capacity(backend.facts.len());
        for (position, instance) in backend.instances().iter().enumerate() {
            let pool_index = claims.pool_of(backend, position as u32);
            if pool_index.is_none() && !backend.facts[position].ours {
                of_backend.push(None);
                continue;
            }
            let price = instance_price(desired, prices, instance, pool_index);
            let billed = is_billed(instance.state, billing);
            if billed {
                before.add(price, 1.0);
            }
            of_backend.push(Some((price, billed)));
        }
        managed.insert(backend.name, of_backend);
    }
    // A change's instance by its id: the last managed one listed with that id (ids are listed once, but should
    // one be listed twice, the last one's price stands, as it always has).
    let existing = |target: &InstanceTarget| {
        let id = target.id.as_ref()?;
        let backend = backends.get(&target.backend)?;
        let of_backend = managed.get(backend.name)?;
        if backend.has_duplicate_ids() {
            let instances = backend.instances();
            return (0..instances.len()).rev().find_map(|position| {
                if &instances[position].id == id {
                    of_backend[position]
                } else {
                    None
                }
            });
        }
        of_backend[*backend.by_id.get(id)? as usize]
    };

    // The price of a pool's new instance, once per pool rather than once per create (first pool of a name wins,
    // as in `Desired::pool`).
    let mut new_prices: FastMap<&str, Option<&Price>> = FastMap::default();
    for pool in &desired.pools {
        new_prices.entry(pool.name.as_str()).or_insert_with(|| {
            let prices = &backends.get(&pool.backend.backend)?.observation.prices;
            prices.get(machine_type(&pool.backend.machine)?)
        });
    }
    let mut after = before.clone();
    for change in changes {
        let Some(target) = &change.instance else {
            continue;
        };
        let existing = existing(target);
        let new_price = || new_prices.get(change.pool.as_str()).copied().flatten();
        match (change.action, existing) {
            (Action::Create, _) => after.add(new_price(), 1.0),
            (Action::Delete, Some((price, true))) => after.add(price, -1.0),
            (Action::Stop, Some((price, true))) if billing_of(&target.backend) == Billing::PerSecond => {
                after.add(price, -1.0)
            }
            (Action::Start, Some((price, false))) => after.add(price, 1.0),
            (Action::Replace, Some((price, billed))) => {
                if billed {
                    after.add(price, -1.0);
                }
                after.add(new_price(), 1.0);
            }
            _ => {}
        }
    }

    // Every currency of `after` is one of `before` or came after them.
    let hourly = after
        .by_currency
        .iter()
        .map(|(currency, _)| {
            let line = CostLine {
                before: round(before.get(currency).unwrap_or(0.0)),
                after: round(after.get(currency).unwrap_or(0.0)),
            };
            ((*currency).to_owned(), line)
        })
        .collect();
    Cost { hourly, unpriced_before: before.unpriced.max(0) as u32, unpriced_after: after.unpriced.max(0) as u32 }
}

/// Price of an instance: by its reported machine type, else by the machine type of the pool it belongs to.
fn instance_price<'a>(
    desired: &Desired,
    prices: &'a BTreeMap<String, Price>,
    instance: &Instance,
    pool_index: Option<usize>,
) -> Option<&'a Price> {
    let pool_machine = pool_index.and_then(|index| desired.pools.get(index)).map(|pool| &pool.backend.machine);
    let kind = machine_type(&instance.attributes).or_else(|| pool_machine.and_then(machine_type))?;
    prices.get(kind)
}

/// Float sums drift in the last bits (0.1 + 0.2); six decimals keep the JSON stable and readable.
fn round(value: f64) -> f64 {
    let rounded = (value * 1e6).round() / 1e6;
    if rounded == 0.0 {
        0.0 // no `-0.0` in the output
    } else {
        rounded
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::{machine_type, Tally};
    use crate::model::Price;

    fn attributes(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(key, value)| ((*key).to_owned(), (*value).to_owned())).collect()
    }

    #[test]
    fn the_most_specific_machine_type_key_wins_whatever_the_order() {
        // `type` sorts last and `instanceType` before `server_type`: the rank decides, not the map's order.
        let all = attributes(&[("type", "t"), ("instanceType", "i"), ("server_type", "s"), ("serverType", "S")]);
        assert_eq!(machine_type(&all), Some("s"));
        assert_eq!(
            machine_type(&attributes(&[("type", "t"), ("instanceType", "t3.small, t3.large")])),
            Some("t3.small")
        );
        assert_eq!(machine_type(&attributes(&[("type", "cx22,cx32")])), Some("cx22"));
        assert_eq!(machine_type(&attributes(&[("image", "debian"), ("Type", "x")])), None);
    }

    #[test]
    fn sums_are_kept_per_currency_and_unpriced_instances_counted() {
        let eur = Price { hourly: 0.5, currency: "EUR".into() };
        let usd = Price { hourly: 0.25, currency: "USD".into() };
        // Another allocation of the same currency text: the same sum.
        let eur_again = Price { hourly: 1.0, currency: String::from("EU") + "R" };
        let mut tally = Tally::default();
        tally.add(Some(&eur), 1.0);
        tally.add(Some(&usd), 1.0);
        tally.add(Some(&eur_again), 1.0);
        tally.add(None, 1.0);
        tally.add(Some(&usd), -1.0);
        assert_eq!(tally.get("EUR"), Some(1.5));
        assert_eq!(tally.get("USD"), Some(0.0));
        assert_eq!(tally.get("CHF"), None);
        assert_eq!(tally.unpriced, 1);
        // A first negative zero sums to a positive zero, as the map's `or_default() +=` did.
        let free = Price { hourly: 0.0, currency: "EUR".into() };
        let mut removed = Tally::default();
        removed.add(Some(&free), -1.0);
        assert!(removed.get("EUR").is_some_and(|sum| sum == 0.0 && sum.is_sign_positive()));
    }
}
