//! Quantities, units and other one-byte codes.
//!
//! Each enum travels as one byte. The codes are stable: a code is never reused or renumbered, new
//! ones are appended. A code this build does not know decodes as `Other(code)` rather than failing,
//! so an older gateway still accepts frames from newer nodes.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Defines a one-byte coded enum with an `Other(u8)` fallback, its code table and serde as `u8`.
macro_rules! coded_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $code:literal => $label:literal, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[cfg_attr(feature = "defmt", derive(defmt::Format))]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )*
            /// A code this build does not know (sent by newer software). Never holds a known code.
            Other(u8),
        }

        impl $name {
            /// Every known variant, in code order.
            pub const ALL: &'static [$name] = &[$( $name::$variant, )*];

            /// The stable wire code.
            pub const fn code(self) -> u8 {
                match self {
                    $( $name::$variant => $code, )*
                    $name::Other(code) => code,
                }
            }

            /// The variant for a wire code; unknown codes become `Other(code)`.
            pub const fn from_code(code: u8) -> Self {
                match code {
                    $( $code => $name::$variant, )*
                    other => $name::Other(other),
                }
            }

            /// A stable snake_case name, usable in MQTT topics and metric labels.
            pub const fn name(self) -> &'static str {
                match self {
                    $( $name::$variant => $label, )*
                    $name::Other(_) => "other",
                }
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_u8(self.code())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                u8::deserialize(deserializer).map(Self::from_code)
            }
        }
    };
}

coded_enum! {
    /// What a sensor channel measures.
    pub enum Quantity {
        Temperature = 1 => "temperature",
        Humidity = 2 => "humidity",
        Pressure = 3 => "pressure",
        Voltage = 4 => "voltage",
        /// State of charge of the node's battery.
        Battery = 5 => "battery",
        Illuminance = 6 => "illuminance",
        Co2 = 7 => "co2",
        /// A generic monotonic or event counter.
        Counter = 8 => "counter",
        Current = 9 => "current",
        Power = 10 => "power",
        Energy = 11 => "energy",
        Pm25 = 12 => "pm25",
        /// Soil or material moisture.
        Moisture = 13 => "moisture",
        Distance = 14 => "distance",
        SignalStrength = 15 => "signal_strength",
    }
}

impl Quantity {
    /// The Home Assistant sensor `device_class`, if one fits.
    pub const fn device_class(self) -> Option<&'static str> {
        match self {
            Quantity::Temperature => Some("temperature"),
            Quantity::Humidity => Some("humidity"),
            Quantity::Pressure => Some("pressure"),
            Quantity::Voltage => Some("voltage"),
            Quantity::Battery => Some("battery"),
            Quantity::Illuminance => Some("illuminance"),
            Quantity::Co2 => Some("carbon_dioxide"),
            Quantity::Current => Some("current"),
            Quantity::Power => Some("power"),
            Quantity::Energy => Some("energy"),
            Quantity::Pm25 => Some("pm25"),
            Quantity::Moisture => Some("moisture"),
            Quantity::Distance => Some("distance"),
            Quantity::SignalStrength => Some("signal_strength"),
            Quantity::Counter | Quantity::Other(_) => None,
        }
    }

    /// The unit a node normally reports this quantity in.
    pub const fn default_unit(self) -> Unit {
        match self {
            Quantity::Temperature => Unit::DegreeCelsius,
            Quantity::Humidity => Unit::PercentRh,
            Quantity::Pressure => Unit::Hectopascal,
            Quantity::Voltage => Unit::Volt,
            Quantity::Battery | Quantity::Moisture => Unit::Percent,
            Quantity::Illuminance => Unit::Lux,
            Quantity::Co2 => Unit::Ppm,
            Quantity::Counter => Unit::Count,
            Quantity::Current => Unit::Ampere,
            Quantity::Power => Unit::Watt,
            Quantity::Energy => Unit::WattHour,
            Quantity::Pm25 => Unit::MicrogramPerCubicMetre,
            Quantity::Distance => Unit::Millimetre,
            Quantity::SignalStrength => Unit::DecibelMilliwatt,
            Quantity::Other(_) => Unit::None,
        }
    }

    /// Symbol of the default unit (Home Assistant `unit_of_measurement`).
    pub const fn unit(self) -> &'static str {
        self.default_unit().symbol()
    }
}

coded_enum! {
    /// The unit of a channel's values.
    pub enum Unit {
        /// Dimensionless.
        None = 0 => "none",
        DegreeCelsius = 1 => "celsius",
        /// Relative humidity.
        PercentRh = 2 => "percent_rh",
        Hectopascal = 3 => "hectopascal",
        Pascal = 4 => "pascal",
        Volt = 5 => "volt",
        Millivolt = 6 => "millivolt",
        Percent = 7 => "percent",
        Lux = 8 => "lux",
        Ppm = 9 => "ppm",
        Count = 10 => "count",
        Ampere = 11 => "ampere",
        Milliampere = 12 => "milliampere",
        Watt = 13 => "watt",
        WattHour = 14 => "watt_hour",
        KilowattHour = 15 => "kilowatt_hour",
        MicrogramPerCubicMetre = 16 => "microgram_per_cubic_metre",
        Millimetre = 17 => "millimetre",
        DecibelMilliwatt = 18 => "dbm",
        DegreeFahrenheit = 19 => "fahrenheit",
    }
}

impl Unit {
    /// The symbol, as Home Assistant expects in `unit_of_measurement` ("" when dimensionless).
    pub const fn symbol(self) -> &'static str {
        match self {
            Unit::None | Unit::Count | Unit::Other(_) => "",
            Unit::DegreeCelsius => "°C",
            Unit::PercentRh | Unit::Percent => "%",
            Unit::Hectopascal => "hPa",
            Unit::Pascal => "Pa",
            Unit::Volt => "V",
            Unit::Millivolt => "mV",
            Unit::Lux => "lx",
            Unit::Ppm => "ppm",
            Unit::Ampere => "A",
            Unit::Milliampere => "mA",
            Unit::Watt => "W",
            Unit::WattHour => "Wh",
            Unit::KilowattHour => "kWh",
            Unit::MicrogramPerCubicMetre => "µg/m³",
            Unit::Millimetre => "mm",
            Unit::DecibelMilliwatt => "dBm",
            Unit::DegreeFahrenheit => "°F",
        }
    }

    /// Same as [`Unit::symbol`].
    pub const fn unit(self) -> &'static str {
        self.symbol()
    }
}

coded_enum! {
    /// Why a receiver refused a frame (negative [`crate::Ack`]).
    pub enum NackReason {
        /// The frame decoded but its content is invalid (e.g. an interval of zero).
        InvalidArgument = 1 => "invalid_argument",
        /// The receiver does not support this kind or command (older firmware or gateway).
        Unsupported = 2 => "unsupported",
        /// The receiver cannot take it now; retry later.
        Busy = 3 => "busy",
        /// The gateway's durable store is full; the node should keep the data and retry.
        StorageFull = 4 => "storage_full",
        /// The gateway does not know this node (no `Hello` yet); the node should send `Hello`.
        UnknownNode = 5 => "unknown_node",
        /// The frame's body could not be decoded.
        Undecodable = 6 => "undecodable",
    }
}
