// A small fleet of vehicles driving around a city centre, each publishing its GPS position
// over MQTT every 500 ms to `vehicles/<id>/position` (JSON). Warren routes them through
// amq.topic, where the browser page reads them over Web-STOMP as /topic/vehicles.*.position.
//
//   node simulator.js [--url mqtt://127.0.0.1:1883] [--vehicles 8] [--interval 500] [--count N]
import mqtt from "mqtt";

export function startFleet({ url = "mqtt://127.0.0.1:1883", vehicles = 8, interval = 500, count = Infinity } = {}) {
  const centre = { lat: 52.52, lon: 13.405 };
  const fleet = Array.from({ length: vehicles }, (_, i) => ({
    id: `truck-${String(i + 1).padStart(2, "0")}`,
    lat: centre.lat + (Math.random() - 0.5) * 0.05,
    lon: centre.lon + (Math.random() - 0.5) * 0.08,
    heading: Math.random() * 2 * Math.PI,
    speed: 20 + Math.random() * 40, // km/h
  }));
  const client = mqtt.connect(url, { clientId: `fleet-${process.pid}-${Date.now()}`, clean: true });
  let sent = 0;
  let timer;
  const ready = new Promise((resolve, reject) => {
    client.once("connect", resolve);
    client.once("error", reject);
  });
  client.on("connect", () => {
    clearInterval(timer);
    timer = setInterval(() => {
      for (const v of fleet) {
        v.heading += (Math.random() - 0.5) * 0.4;
        const km = (v.speed * interval) / 3_600_000;
        v.lat += (Math.cos(v.heading) * km) / 111;
        v.lon += (Math.sin(v.heading) * km) / (111 * Math.cos((v.lat * Math.PI) / 180));
        const position = { id: v.id, lat: +v.lat.toFixed(6), lon: +v.lon.toFixed(6), speed: Math.round(v.speed), ts: Date.now() };
        client.publish(`vehicles/${v.id}/position`, JSON.stringify(position), { qos: 0 });
      }
      sent += 1;
      if (sent >= count) stop();
    }, interval);
  });
  function stop() {
    clearInterval(timer);
    client.end();
  }
  return { ready, stop, fleet };
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const arg = (name, dflt) => {
    const i = process.argv.indexOf(`--${name}`);
    return i > 0 ? process.argv[i + 1] : dflt;
  };
  const fleet = startFleet({
    url: arg("url", "mqtt://127.0.0.1:1883"),
    vehicles: Number(arg("vehicles", 8)),
    interval: Number(arg("interval", 500)),
    count: Number(arg("count", Infinity)),
  });
  fleet.ready.then(() => console.log(`publishing ${fleet.fleet.length} vehicles to vehicles/<id>/position`));
  process.on("SIGINT", () => { fleet.stop(); process.exit(0); });
}
