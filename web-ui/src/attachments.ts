// Encrypted attachments (Matrix spec "Sending encrypted attachments", v2):
// AES-256-CTR with a random key and a 64-bit random IV prefix (the counter half
// starts at zero), the ciphertext's SHA-256 in the event. The ciphers are
// @noble/ciphers and @noble/hashes (audited, pure JS), not WebCrypto: the box's
// page is plain http://, where browsers do not offer crypto.subtle.
import { ctr } from "@noble/ciphers/aes.js";
import { sha256 } from "@noble/hashes/sha2.js";

export type EncryptedFile = {
  url: string;
  key: { kty: "oct"; key_ops: string[]; alg: "A256CTR"; k: string; ext: true };
  iv: string;
  hashes: { sha256: string };
  v: "v2";
};

function b64(bytes: Uint8Array): string {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(s).replace(/=+$/, "");
}

function unb64(text: string): Uint8Array {
  const std = text.replace(/-/g, "+").replace(/_/g, "/");
  const bin = atob(std + "===".slice((std.length + 3) % 4));
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

const b64url = (bytes: Uint8Array) => b64(bytes).replace(/\+/g, "-").replace(/\//g, "_");

/** Encrypts `plain`; the caller uploads `data` and fills in `info.url`. */
export function encryptAttachment(plain: Uint8Array): { data: Uint8Array; info: Omit<EncryptedFile, "url"> } {
  const key = crypto.getRandomValues(new Uint8Array(32));
  const iv = new Uint8Array(16);
  crypto.getRandomValues(iv.subarray(0, 8));
  const data = ctr(key, iv).encrypt(plain);
  return {
    data,
    info: {
      key: { kty: "oct", key_ops: ["encrypt", "decrypt"], alg: "A256CTR", k: b64url(key), ext: true },
      iv: b64(iv),
      hashes: { sha256: b64(sha256(data)) },
      v: "v2",
    },
  };
}

/** Checks the ciphertext's hash, then decrypts. Throws on any mismatch. */
export function decryptAttachment(data: Uint8Array, file: EncryptedFile): Uint8Array {
  if (file?.key?.alg !== "A256CTR" || typeof file.key.k !== "string" || typeof file.iv !== "string") {
    throw new Error("unsupported encrypted file");
  }
  const want = file.hashes?.sha256;
  if (typeof want !== "string" || b64(sha256(data)) !== want.replace(/=+$/, "")) {
    throw new Error("attachment hash mismatch");
  }
  const key = unb64(file.key.k);
  const iv = unb64(file.iv);
  if (key.length !== 32 || iv.length !== 16) throw new Error("bad key or iv length");
  return ctr(key, iv).decrypt(data);
}
