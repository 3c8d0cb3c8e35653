// Milesight EM300-TH temperature and humidity sensor: TS013 decodeUplink.
// Written for iotflow from the device's public payload description:
//   EM300 Series User Guide, section 5 "Device Payload" (channel, type, little-endian data):
//   channel 0x01 type 0x75 battery, UINT8 %; channel 0x03 type 0x67 temperature,
//   INT16 0.1 °C; channel 0x04 type 0x68 humidity, UINT8 0.5 %RH; channel 0xff: device
//   information (0x01 protocol, 0x09 hardware, 0x0a software version, 0x0f class, 0x16 SN).
//   https://www.milesight.com/products/docs/en/em320-th/protocol/ipso-overview.html
//   https://manualshive.com/ru/manual/milesight/em300-series/1795248?page=23 (examples)

function decodeUplink(input) {
  var b = input.bytes;
  var data = {};
  var warnings = [];
  var i = 0;
  while (i + 1 < b.length) {
    var channel = b[i];
    var type = b[i + 1];
    i += 2;
    if (channel === 0x01 && type === 0x75) {
      data.battery = b[i];
      i += 1;
    } else if (channel === 0x03 && type === 0x67) {
      var t = b[i] | (b[i + 1] << 8);
      if (t > 0x7fff) t -= 0x10000;
      data.temperature = t / 10;
      i += 2;
    } else if (channel === 0x04 && type === 0x68) {
      data.humidity = b[i] / 2;
      i += 1;
    } else if (channel === 0xff && (type === 0x01 || type === 0x0f)) {
      if (type === 0x01) data.protocolVersion = b[i];
      else data.deviceClass = ["Class A", "Class B", "Class C"][b[i]];
      i += 1;
    } else if (channel === 0xff && (type === 0x09 || type === 0x0a)) {
      // The guide's examples: hardware 01 40 => V1.4 (minor in the high nibble),
      // software 01 14 => V1.14 (minor as its hex digits).
      if (type === 0x09) data.hardwareVersion = "v" + b[i] + "." + (b[i + 1] >> 4);
      else data.softwareVersion = "v" + b[i] + "." + b[i + 1].toString(16);
      i += 2;
    } else if (channel === 0xff && type === 0x16) {
      var sn = "";
      for (var k = 0; k < 8; k++) sn += ("0" + b[i + k].toString(16)).slice(-2);
      data.serialNumber = sn;
      i += 8;
    } else {
      return { errors: ["unknown channel " + channel + " type " + type + " at byte " + (i - 2)] };
    }
    if (i > b.length) return { errors: ["truncated payload"] };
  }
  if (i !== b.length) warnings.push("trailing byte ignored");
  return { data: data, warnings: warnings };
}
