function decodeUplink(input) { var a = []; while (true) { a.push(new Array(100000).fill(input.fPort)); } }
