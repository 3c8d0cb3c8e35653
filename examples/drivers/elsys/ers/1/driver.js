// Elsys ERS room sensor: TS013 decodeUplink.
// Written for iotflow from Elsys's public payload description ("Elsys LoRaWAN payload":
// a sequence of type byte + value, big-endian): 0x01 temperature, 2 bytes signed, 0.1 °C;
// 0x02 humidity, 1 byte %; 0x03 acceleration, 3 signed bytes X Y Z (63 = 1 G);
// 0x04 light, 2 bytes lux; 0x05 motion count, 1 byte; 0x06 CO2, 2 bytes ppm;
// 0x07 supply voltage, 2 bytes mV; 0x14 pressure, 4 bytes, 0.001 hPa.
//   https://docs.tesenso.com/tesenso-device-library/elsys/elsys-ers/ers-eco (type table)
//   https://www.elsys.se/en/elsys-payload/

function s16(hi, lo) {
  var v = (hi << 8) | lo;
  return v > 0x7fff ? v - 0x10000 : v;
}

function s8(v) {
  return v > 0x7f ? v - 0x100 : v;
}

// type → [length in bytes, reader(bytes, offset, data)]
var TYPES = {
  0x01: [2, function (b, i, d) { d.temperature = s16(b[i], b[i + 1]) / 10; }],
  0x02: [1, function (b, i, d) { d.humidity = b[i]; }],
  0x03: [3, function (b, i, d) { d.acceleration = { x: s8(b[i]), y: s8(b[i + 1]), z: s8(b[i + 2]) }; }],
  0x04: [2, function (b, i, d) { d.light = (b[i] << 8) | b[i + 1]; }],
  0x05: [1, function (b, i, d) { d.motion = b[i]; }],
  0x06: [2, function (b, i, d) { d.co2 = (b[i] << 8) | b[i + 1]; }],
  0x07: [2, function (b, i, d) { d.vdd = (b[i] << 8) | b[i + 1]; }],
  0x14: [4, function (b, i, d) {
    d.pressure = ((b[i] << 24) >>> 0) + (b[i + 1] << 16) + (b[i + 2] << 8) + b[i + 3];
    d.pressure /= 1000;
  }]
};

function decodeUplink(input) {
  var b = input.bytes;
  var data = {};
  var i = 0;
  while (i < b.length) {
    var type = TYPES[b[i]];
    if (type === undefined) {
      return { errors: ["unknown type 0x" + b[i].toString(16) + " at byte " + i] };
    }
    if (i + 1 + type[0] > b.length) {
      return { errors: ["truncated value of type 0x" + b[i].toString(16)] };
    }
    type[1](b, i + 1, data);
    i += 1 + type[0];
  }
  return { data: data, warnings: [] };
}
