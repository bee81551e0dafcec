package nbd

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"testing"
)

// BenchmarkRead measures READ requests through ServeTransmission over a unix
// socket pair (the kernel path's transport) from an in-memory device, with
// depth requests kept in flight. allocs/op counts the whole process, client
// included, so 0 means the server's request path does not allocate.
func BenchmarkRead(b *testing.B) {
	for _, size := range []int{4 << 10, 128 << 10, 1 << 20} {
		for _, depth := range []int{1, 32} {
			b.Run(fmt.Sprintf("size=%dK/depth=%d", size>>10, depth), func(b *testing.B) {
				benchmarkRead(b, size, depth)
			})
		}
	}
}

func benchmarkRead(b *testing.B, size, depth int) {
	const devSize = 64 << 20
	dev := &memDevice{data: randomBytes(devSize, 40)}
	c, _ := startEngine(b, context.Background(), dev, TransmissionOptions{})
	slots := devSize / size

	// Requests are pre-encoded; the cookie says which offset each one read.
	reqs := make([][]byte, slots)
	for i := range reqs {
		reqs[i] = encodeRequest(nil, 0, cmdRead, uint64(i), uint64(i*size), uint32(size))
	}
	reply := make([]byte, replyHeaderSize+size)
	readReply := func() {
		if _, err := io.ReadFull(c.br, reply); err != nil {
			b.Fatal(err)
		}
		if errno := binary.BigEndian.Uint32(reply[4:8]); errno != 0 {
			b.Fatalf("errno %d", errno)
		}
	}
	send := func(i int) {
		if _, err := c.conn.Write(reqs[i%slots]); err != nil {
			b.Fatal(err)
		}
	}

	// Warm the buffer pools and the connection.
	for i := range depth {
		send(i)
	}
	for range depth {
		readReply()
	}

	b.SetBytes(int64(size))
	b.ReportAllocs()
	b.ResetTimer()
	sent := 0
	for ; sent < min(depth, b.N); sent++ {
		send(sent)
	}
	for range b.N {
		readReply()
		if sent < b.N {
			send(sent)
			sent++
		}
	}
	b.StopTimer()
	// Spot-check the last reply's data against the device.
	i := int(binary.BigEndian.Uint64(reply[8:16]))
	checkBytes(b, reply[replyHeaderSize:], dev.data[i*size:(i+1)*size], "benchmark reply")
}
