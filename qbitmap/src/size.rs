// SPDX-License-Identifier: GPL-2.0-or-later

//! Sizes as qemu-img reads and prints them.
//!
//! Parsing accepts what `qemu-img` accepts — plain bytes (`512`, `0x200`) or a number with a
//! binary suffix (`64K`, `1.5G`, `2T`; any of `B K M G T P E`, either case) — plus the spelled-out
//! forms `KiB`, `KB`, `MiB`… for convenience. Formatting follows qemu-img's `size_to_str`: three
//! significant digits and a binary unit (`64 KiB`, `1.5 GiB`, `1 TiB`).

const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];

/// Parses a size in bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty size".into());
    }
    if let Some(hex) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        return u64::from_str_radix(hex, 16)
            .map_err(|_| format!("'{text}' is not a valid hexadecimal size"));
    }
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let shift = match suffix.trim_start().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        "e" | "eb" | "eib" => 60,
        _ => {
            return Err(format!(
                "'{text}' has an unknown suffix '{suffix}' (use one of B, K, M, G, T, P, E)"
            ))
        }
    };
    let invalid = || format!("'{text}' is not a valid size");
    if number.is_empty() || number.starts_with('.') || number.ends_with('.') {
        return Err(invalid());
    }
    let (whole, fraction) = match number.split_once('.') {
        Some((whole, fraction)) if !fraction.contains('.') => (whole, Some(fraction)),
        Some(_) => return Err(invalid()),
        None => (number, None),
    };
    let whole: u64 = whole.parse().map_err(|_| invalid())?;
    let too_large = || format!("'{text}' is too large (the limit is 16 EiB - 1)");
    let mut bytes = whole.checked_mul(1u64 << shift).ok_or_else(too_large)?;
    if let Some(fraction) = fraction {
        if shift == 0 {
            return Err(format!("'{text}': a fractional size needs a unit suffix"));
        }
        // Exact decimal fraction times 2^shift, rounded down like qemu's strtosz.
        let digits = fraction.len().min(18) as u32;
        let numerator: u128 = fraction[..digits as usize].parse().map_err(|_| invalid())?;
        let extra = (numerator << shift) / 10u128.pow(digits);
        bytes = u64::try_from(u128::from(bytes) + extra).map_err(|_| too_large())?;
    }
    Ok(bytes)
}

/// Parses a size that must be a power of two: a bitmap granularity or a cluster size.
pub fn parse_power_of_two(text: &str) -> Result<u64, String> {
    let bytes = parse_size(text)?;
    if !bytes.is_power_of_two() {
        return Err(if text.trim() == bytes.to_string() {
            format!("{bytes} is not a power of two")
        } else {
            format!("{text} ({bytes} bytes) is not a power of two")
        });
    }
    Ok(bytes)
}

/// Formats a size for people, like qemu-img's `size_to_str`: `512 B`, `64 KiB`, `1.5 GiB`.
pub fn format_size(bytes: u64) -> String {
    // Like qemu: switch to the next unit from 1000 of the current one on (1000 KiB is 0.977 MiB).
    let mut unit = 0;
    while unit + 1 < UNITS.len() && bytes as f64 >= 1000.0 * (1u64 << (10 * unit)) as f64 {
        unit += 1;
    }
    let value = bytes as f64 / (1u64 << (10 * unit)) as f64;
    format!("{} {}", three_digits(value), UNITS[unit])
}

/// `%0.3g` for values from 0 to below 1000: three significant digits, no trailing zeros.
fn three_digits(value: f64) -> String {
    let decimals = if value >= 99.95 {
        0
    } else if value >= 9.995 {
        1
    } else if value >= 0.9995 || value == 0.0 {
        2
    } else {
        3
    };
    let text = format!("{value:.decimals$}");
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    }
}

/// A rate in (decimal) megabytes per second, as people compare disk speeds.
pub fn format_rate(bytes: u64, seconds: f64) -> String {
    let rate = bytes as f64 / seconds.max(1e-9) / 1e6;
    if rate >= 100.0 {
        format!("{rate:.0} MB/s")
    } else if rate >= 10.0 {
        format!("{rate:.1} MB/s")
    } else {
        format!("{rate:.2} MB/s")
    }
}

/// An integer with thousands separators: `1,234,567`.
pub fn group_digits(value: u64) -> String {
    let digits = value.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_img_sizes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("0x200"), Ok(512));
        assert_eq!(parse_size("512b"), Ok(512));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("1P"), Ok(1 << 50));
        assert_eq!(parse_size("1E"), Ok(1 << 60));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("0.5K"), Ok(512));
        assert!(parse_size("").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("1.5").is_err());
        assert!(parse_size("K").is_err());
        assert!(parse_size("1..5K").is_err());
        assert!(parse_size("16E").is_err());
        assert!(parse_size("99999999999999999999").is_err());
    }

    #[test]
    fn powers_of_two() {
        assert_eq!(parse_power_of_two("64K"), Ok(65536));
        assert!(parse_power_of_two("3000").is_err());
        assert!(parse_power_of_two("0").is_err());
    }

    #[test]
    fn formats_like_qemu_img() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(512), "512 B");
        assert_eq!(format_size(999), "999 B");
        assert_eq!(format_size(1000), "0.977 KiB");
        assert_eq!(format_size(1024), "1 KiB");
        assert_eq!(format_size(1536), "1.5 KiB");
        assert_eq!(format_size(65536), "64 KiB");
        assert_eq!(format_size(200 << 20), "200 MiB");
        assert_eq!(format_size(1 << 40), "1 TiB");
        assert_eq!(format_size(u64::MAX), "16 EiB");
    }

    #[test]
    fn groups_digits() {
        assert_eq!(group_digits(0), "0");
        assert_eq!(group_digits(999), "999");
        assert_eq!(group_digits(1000), "1,000");
        assert_eq!(group_digits(1234567), "1,234,567");
    }
}
