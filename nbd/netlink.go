package nbd

// The nbd generic netlink family (<linux/nbd-netlink.h>), spoken through
// mdlayher/genetlink. Numbers are the kernel's uapi values; see
// /work/shared/docs/nbd-kernel.md §2. Attribute payloads are host-endian,
// which is the encoder's default.

import (
	"errors"
	"fmt"
	"os"

	"github.com/mdlayher/genetlink"
	"github.com/mdlayher/netlink"
)

const (
	nlFamilyName = "nbd"
	nlVersion    = 1

	// Commands (enum nbd_commands).
	nlCmdConnect     = 1
	nlCmdDisconnect  = 2
	nlCmdReconfigure = 3
	nlCmdLinkDead    = 4 // kernel → multicast; not listened to
	nlCmdStatus      = 5

	// Top-level attributes (enum nbd_attrs).
	nlAttrIndex             = 1  // u32
	nlAttrSizeBytes         = 2  // u64
	nlAttrBlockSizeBytes    = 3  // u64
	nlAttrTimeout           = 4  // u64 seconds
	nlAttrServerFlags       = 5  // u64
	nlAttrClientFlags       = 6  // u64
	nlAttrSockets           = 7  // nested list of nlSockItem
	nlAttrDeadConnTimeout   = 8  // u64 seconds
	nlAttrDeviceList        = 9  // nested list of nlDeviceItem (STATUS reply)
	nlAttrBackendIdentifier = 10 // string

	// Inside nlAttrSockets.
	nlSockItem = 1 // nested
	nlSockFD   = 1 // u32

	// Inside nlAttrDeviceList.
	nlDeviceItem      = 1 // nested
	nlDeviceIndex     = 1 // u32
	nlDeviceConnected = 2 // u8
)

// nlConnectRequest is NBD_CMD_CONNECT's payload.
type nlConnectRequest struct {
	// Index is the device to configure, or AnyDevice to leave the attribute
	// out so the kernel picks (or creates) a free device. Current kernels
	// reject an explicit -1.
	Index           int
	SizeBytes       uint64
	BlockSizeBytes  uint64
	TimeoutSeconds  uint64
	DeadConnSeconds uint64
	ServerFlags     uint64
	BackendID       string // omitted when empty
	SocketFDs       []int
}

func (r nlConnectRequest) encode() ([]byte, error) {
	if len(r.SocketFDs) == 0 {
		return nil, errors.New("nbd: netlink connect without sockets")
	}
	ae := netlink.NewAttributeEncoder()
	if r.Index != AnyDevice {
		ae.Uint32(nlAttrIndex, uint32(r.Index))
	}
	ae.Uint64(nlAttrSizeBytes, r.SizeBytes)
	ae.Uint64(nlAttrBlockSizeBytes, r.BlockSizeBytes)
	ae.Uint64(nlAttrTimeout, r.TimeoutSeconds)
	ae.Uint64(nlAttrServerFlags, r.ServerFlags)
	ae.Uint64(nlAttrDeadConnTimeout, r.DeadConnSeconds)
	if r.BackendID != "" {
		ae.String(nlAttrBackendIdentifier, r.BackendID)
	}
	encodeNLSockets(ae, r.SocketFDs)
	return ae.Encode()
}

// nlReconfigureRequest is NBD_CMD_RECONFIGURE's payload: fresh sockets for
// a running netlink device. Size and block size are never sent: changing
// them freezes the queue until in-flight I/O completes, which the server
// sending the command may be the one to answer (a deadlock).
type nlReconfigureRequest struct {
	Index           int
	TimeoutSeconds  uint64
	DeadConnSeconds uint64
	// BackendID must repeat the identifier the device was created with.
	BackendID string
	SocketFDs []int
}

func (r nlReconfigureRequest) encode() ([]byte, error) {
	if r.Index < 0 {
		return nil, fmt.Errorf("nbd: netlink reconfigure needs a device index, got %d", r.Index)
	}
	ae := netlink.NewAttributeEncoder()
	ae.Uint32(nlAttrIndex, uint32(r.Index))
	ae.Uint64(nlAttrTimeout, r.TimeoutSeconds)
	ae.Uint64(nlAttrDeadConnTimeout, r.DeadConnSeconds)
	if r.BackendID != "" {
		ae.String(nlAttrBackendIdentifier, r.BackendID)
	}
	if len(r.SocketFDs) > 0 {
		encodeNLSockets(ae, r.SocketFDs)
	}
	return ae.Encode()
}

// encodeNLSockets appends SOCKETS { SOCK_ITEM { SOCK_FD fd } ... }.
func encodeNLSockets(ae *netlink.AttributeEncoder, fds []int) {
	ae.Nested(nlAttrSockets, func(items *netlink.AttributeEncoder) error {
		for _, fd := range fds {
			items.Nested(nlSockItem, func(item *netlink.AttributeEncoder) error {
				item.Uint32(nlSockFD, uint32(fd))
				return nil
			})
		}
		return nil
	})
}

// encodeNLIndex is the payload of DISCONNECT, and of STATUS for one device.
func encodeNLIndex(index int) ([]byte, error) {
	if index < 0 {
		return nil, fmt.Errorf("nbd: device index %d is negative", index)
	}
	ae := netlink.NewAttributeEncoder()
	ae.Uint32(nlAttrIndex, uint32(index))
	return ae.Encode()
}

// decodeNLIndex reads NBD_ATTR_INDEX from CONNECT's reply.
func decodeNLIndex(b []byte) (int, error) {
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		return 0, fmt.Errorf("nbd: netlink reply: %w", err)
	}
	index := -1
	for ad.Next() {
		if ad.Type() == nlAttrIndex {
			index = int(ad.Uint32())
		}
	}
	if err := ad.Err(); err != nil {
		return 0, fmt.Errorf("nbd: netlink reply: %w", err)
	}
	if index < 0 {
		return 0, errors.New("nbd: netlink reply carries no device index")
	}
	return index, nil
}

// nlDeviceStatus is one entry of STATUS's DEVICE_LIST.
type nlDeviceStatus struct {
	Index     int
	Connected bool
}

// decodeNLStatus reads DEVICE_LIST { DEVICE_ITEM { INDEX, CONNECTED } ... }.
func decodeNLStatus(b []byte) ([]nlDeviceStatus, error) {
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		return nil, fmt.Errorf("nbd: netlink status: %w", err)
	}
	var out []nlDeviceStatus
	for ad.Next() {
		if ad.Type() != nlAttrDeviceList {
			continue
		}
		ad.Nested(func(list *netlink.AttributeDecoder) error {
			for list.Next() {
				if list.Type() != nlDeviceItem {
					continue
				}
				st := nlDeviceStatus{Index: -1}
				list.Nested(func(item *netlink.AttributeDecoder) error {
					for item.Next() {
						switch item.Type() {
						case nlDeviceIndex:
							st.Index = int(item.Uint32())
						case nlDeviceConnected:
							st.Connected = item.Uint8() != 0
						}
					}
					return item.Err()
				})
				if st.Index < 0 {
					return errors.New("device item without an index")
				}
				out = append(out, st)
			}
			return list.Err()
		})
	}
	if err := ad.Err(); err != nil {
		return nil, fmt.Errorf("nbd: netlink status: %w", err)
	}
	return out, nil
}

// errNLFamilyMissing means the kernel has no "nbd" generic netlink family:
// either the module is not loaded or the kernel predates 4.12.
var errNLFamilyMissing = errors.New("nbd: no generic netlink family \"nbd\"")

// nlClient is a generic netlink socket bound to the nbd family. Every command
// except STATUS needs CAP_SYS_ADMIN in the initial user namespace.
type nlClient struct {
	conn   *genetlink.Conn
	family genetlink.Family
}

// dialNBDNetlink opens a socket and resolves the family. Looking the family
// up makes the kernel try to load the module, as `modprobe nbd` would.
func dialNBDNetlink() (*nlClient, error) {
	conn, err := genetlink.Dial(nil)
	if err != nil {
		return nil, fmt.Errorf("nbd: generic netlink: %w", err)
	}
	family, err := conn.GetFamily(nlFamilyName)
	if err != nil {
		conn.Close()
		if errors.Is(err, os.ErrNotExist) {
			return nil, errNLFamilyMissing
		}
		return nil, fmt.Errorf("nbd: generic netlink family %q: %w", nlFamilyName, err)
	}
	return &nlClient{conn: conn, family: family}, nil
}

func (c *nlClient) Close() error { return c.conn.Close() }

// execute sends one command. Commands the kernel answers with a message
// (CONNECT, STATUS) are sent without NLM_F_ACK: the acknowledgement would
// arrive as a second datagram that a later command would then read as its
// reply. Commands without an answer ask for the acknowledgement, which is
// how their success is learnt.
func (c *nlClient) execute(cmd uint8, data []byte, wantReply bool) ([]genetlink.Message, error) {
	flags := netlink.Request
	if !wantReply {
		flags |= netlink.Acknowledge
	}
	msg := genetlink.Message{
		Header: genetlink.Header{Command: cmd, Version: nlVersion},
		Data:   data,
	}
	return c.conn.Execute(msg, c.family.ID, flags)
}

// connect sends NBD_CMD_CONNECT and returns the device index the kernel
// configured.
func (c *nlClient) connect(r nlConnectRequest) (int, error) {
	data, err := r.encode()
	if err != nil {
		return 0, err
	}
	msgs, err := c.execute(nlCmdConnect, data, true)
	if err != nil {
		return 0, err
	}
	if len(msgs) == 0 {
		return 0, errors.New("nbd: netlink connect: no reply")
	}
	return decodeNLIndex(msgs[0].Data)
}

// reconfigure sends NBD_CMD_RECONFIGURE.
func (c *nlClient) reconfigure(r nlReconfigureRequest) error {
	data, err := r.encode()
	if err != nil {
		return err
	}
	_, err = c.execute(nlCmdReconfigure, data, false)
	return err
}

// disconnect sends NBD_CMD_DISCONNECT: the kernel sends NBD_CMD_DISC on every
// socket, fails in-flight I/O and drops the device's configuration.
func (c *nlClient) disconnect(index int) error {
	data, err := encodeNLIndex(index)
	if err != nil {
		return err
	}
	_, err = c.execute(nlCmdDisconnect, data, false)
	return err
}

// status sends NBD_CMD_STATUS for every device.
func (c *nlClient) status() ([]nlDeviceStatus, error) {
	msgs, err := c.execute(nlCmdStatus, nil, true)
	if err != nil {
		return nil, err
	}
	var out []nlDeviceStatus
	for _, m := range msgs {
		st, err := decodeNLStatus(m.Data)
		if err != nil {
			return nil, err
		}
		out = append(out, st...)
	}
	return out, nil
}
