//! The embedded MQTT broker (3.1.1 and 3.1).

pub mod auth;
pub mod codec;
pub mod store;

use std::net::SocketAddr;

use crate::config::ValidConfig;

pub struct Broker {
    addrs: Vec<SocketAddr>,
}

#[derive(Clone)]
pub struct BrokerHandle {}

impl Broker {
    pub async fn start(config: &ValidConfig) -> Result<Broker, crate::Error> {
        let mut addrs = Vec::new();
        for addr in &config.broker.listeners {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| crate::Error::Bind {
                    addr: *addr,
                    source,
                })?;
            addrs.push(l.local_addr().map_err(|source| crate::Error::Bind {
                addr: *addr,
                source,
            })?);
        }
        Ok(Broker { addrs })
    }
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }
    pub fn handle(&self) -> BrokerHandle {
        BrokerHandle {}
    }
    pub async fn shutdown(self) {}
}
