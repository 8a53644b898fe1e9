#include <gtest/gtest.h>

#include "upgraded/artifact/digest.h"
#include "upgraded/artifact/encoding.h"

using namespace upgraded::artifact;

TEST(Hex, RoundTripsAndRefusesUppercaseOrOddInput) {
  std::string s("\x00\x01\xab\xff", 4);
  auto hex = to_hex(as_bytes(s));
  EXPECT_EQ(hex, "0001abff");
  auto back = from_hex(hex);
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(back->size(), 4u);
  EXPECT_FALSE(from_hex("0001ABFF").ok());
  EXPECT_FALSE(from_hex("abc").ok());
  EXPECT_FALSE(from_hex("zz").ok());
}

TEST(Base64, RoundTripsEveryLengthAndRefusesNonCanonicalText) {
  for (std::size_t n = 0; n < 70; ++n) {
    std::string s;
    for (std::size_t i = 0; i < n; ++i)
      s += static_cast<char>(i * 37);
    auto enc = base64_encode(as_bytes(s));
    auto dec = base64_decode(enc);
    ASSERT_TRUE(dec.ok()) << n;
    EXPECT_EQ(std::string(reinterpret_cast<const char*>(dec->data()), dec->size()), s);
  }
  EXPECT_FALSE(base64_decode("QQ").ok());    // missing padding
  EXPECT_FALSE(base64_decode("QR==").ok());  // non-zero unused bits
  EXPECT_FALSE(base64_decode("Q Q=").ok());  // whitespace
  EXPECT_FALSE(base64_decode("QQ=A").ok());  // padding in the middle
}

TEST(Sha256, MatchesTheKnownVector) {
  EXPECT_EQ(to_hex(Sha256::of(as_bytes("abc"))),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  Sha256 h;
  h.update(as_bytes("a"));
  h.update(as_bytes("bc"));
  EXPECT_EQ(to_hex(h.finish()), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  h.update(as_bytes("abc"));  // finish resets
  EXPECT_EQ(to_hex(h.finish()), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}
